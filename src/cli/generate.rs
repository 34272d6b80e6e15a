//! `ferry completions SHELL` and `ferry man`: shell completion scripts and roff man pages, generated from the same
//! clap definition that parses the command line, so they cannot drift from it.

use std::path::PathBuf;

use clap::{Args, CommandFactory};
use clap_complete::Shell;

use super::Cli;
use crate::exit;

/// `ferry completions`.
#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to complete for (bash: source it, or put it in /usr/share/bash-completion/completions/ferry).
    #[arg(value_enum)]
    pub shell: Shell,
}

/// `ferry man`.
#[derive(Args, Debug)]
pub struct ManArgs {
    /// Write one page per command (ferry.1, ferry-push.1, ...) into this directory instead of printing ferry.1.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Prints the completion script for `args.shell` on stdout; returns the exit code.
pub fn completions(args: CompletionsArgs) -> u8 {
    let mut command = Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, "ferry", &mut script);
    write_stdout(&script, "completions")
}

/// Prints ferry's man page on stdout, or writes every command's page into `--out DIR`; returns the exit code.
pub fn man(args: ManArgs) -> u8 {
    let command = Cli::command();
    match args.out {
        Some(dir) => {
            let written = std::fs::create_dir_all(&dir).and_then(|()| clap_mangen::generate_to(command, &dir));
            match written {
                Ok(()) => {
                    eprintln!("ferry: wrote the man pages into {}", dir.display());
                    exit::OK
                }
                Err(e) => {
                    eprintln!("ferry: man: {}: {e}", dir.display());
                    exit::LOCAL
                }
            }
        }
        None => {
            let mut page = Vec::new();
            match clap_mangen::Man::new(command).render(&mut page) {
                Ok(()) => write_stdout(&page, "man"),
                Err(e) => {
                    eprintln!("ferry: man: {e}");
                    exit::INTERNAL
                }
            }
        }
    }
}

/// Writes `bytes` to stdout; a closed pipe (`ferry man | head`) is not worth more than a line on stderr.
fn write_stdout(bytes: &[u8], what: &str) -> u8 {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => exit::OK,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => exit::OK,
        Err(e) => {
            eprintln!("ferry: {what}: writing to stdout: {e}");
            exit::LOCAL
        }
    }
}
