//! The `ferry` binary: parse arguments, set up logging, run the command, map the outcome to an exit code.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use ferry::cli::{Cli, Command};
use ferry::exit;

fn main() -> ExitCode {
    ferry::memory::bound_allocator();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => return ExitCode::from(ferry::cli::argument_error(e, &args)),
    };
    // The demo narrates on stdout; its injected faults would otherwise show up as warnings too.
    let demo = matches!(cli.command, Command::Demo(_)) && cli.verbose == 0;
    init_tracing(cli.verbose, cli.quiet || demo);
    let runtime = match tokio::runtime::Runtime::new().context("starting the async runtime") {
        Ok(runtime) => runtime,
        Err(e) => return fail(e, exit::INTERNAL),
    };
    let quiet = cli.quiet;
    let transfer = matches!(cli.command, Command::Push(_) | Command::Pull(_));
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Push(args) => ExitCode::from(ferry::cli::push(args, quiet).await),
            Command::Pull(args) => ExitCode::from(ferry::cli::pull(args, quiet).await),
            Command::Serve(args) => ExitCode::from(ferry::cli::serve(args).await),
            Command::Keygen(args) => ExitCode::from(ferry::cli::keygen(args)),
            Command::Token(args) => ExitCode::from(ferry::cli::token(args)),
            Command::Gc(args) => ExitCode::from(ferry::cli::gc(args, quiet)),
            Command::Completions(args) => ExitCode::from(ferry::cli::completions(args)),
            Command::Man(args) => ExitCode::from(ferry::cli::man(args)),
            Command::Status(args) => ExitCode::from(ferry::cli::status(args).await),
            Command::Demo(args) => match ferry::cli::demo(args).await.context("demo") {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e, exit::INTEGRITY),
            },
        }
    });
    if transfer {
        // A run stopped by --max-duration may leave a blocking task behind (hashing a large file); do not wait
        // for it (dropping the runtime would).
        runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    }
    code
}

fn fail(error: anyhow::Error, code: u8) -> ExitCode {
    // A closed stderr must not turn the failure into a panic: the exit code still says it.
    let _ = writeln!(std::io::stderr(), "ferry: {error:#}");
    ExitCode::from(code)
}

fn init_tracing(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: journald, log files and pipes get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
