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
    let pages = match pages() {
        Ok(pages) => pages,
        Err(e) => {
            errln!("ferry: man: {e}");
            return exit::INTERNAL;
        }
    };
    let Some(dir) = args.out else {
        return write_stdout(&pages[0].1, "man");
    };
    let written = std::fs::create_dir_all(&dir).and_then(|()| {
        pages
            .iter()
            .try_for_each(|(name, page)| std::fs::write(dir.join(name), page))
    });
    match written {
        Ok(()) => {
            errln!("ferry: wrote the man pages into {}", dir.display());
            exit::OK
        }
        Err(e) => {
            errln!("ferry: man: {}: {e}", dir.display());
            exit::LOCAL
        }
    }
}

/// Every page as (file name, roff): `ferry.1` first, then one per visible subcommand. clap_mangen renders the
/// sections clap knows; EXIT STATUS (from [`exit::TABLE`]), EXAMPLES and SEE ALSO are added here, and SEE ALSO
/// names only pages this function writes. There is no `help` subcommand page, so none is referred to either.
fn pages() -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let mut top = Cli::command().disable_help_subcommand(true);
    top.build();
    let subcommands: Vec<clap::Command> = top.get_subcommands().filter(|s| !s.is_hide_set()).cloned().collect();
    let sub_pages: Vec<String> = subcommands.iter().map(|s| format!("ferry-{}", s.get_name())).collect();
    let mut pages = vec![("ferry.1".to_string(), page(top, "", &sub_pages)?)];
    for sub in subcommands {
        let name = sub.get_name().to_string();
        pages.push((format!("ferry-{name}.1"), page(sub, &name, &["ferry".to_string()])?));
    }
    Ok(pages)
}

/// One page: clap_mangen's sections, then EXIT STATUS, EXAMPLES and SEE ALSO (`see_also`: page names).
fn page(command: clap::Command, name: &str, see_also: &[String]) -> std::io::Result<Vec<u8>> {
    let has_options = command.get_arguments().any(|a| !a.is_hide_set());
    let has_subcommands = command.get_subcommands().any(|s| !s.is_hide_set());
    let has_version = command.get_version().is_some() || command.get_long_version().is_some();
    let man = clap_mangen::Man::new(command);
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    if has_options {
        man.render_options_section(&mut out)?;
    }
    if has_subcommands {
        man.render_subcommands_section(&mut out)?;
    }
    out.extend_from_slice(exit_status().as_bytes());
    out.extend_from_slice(examples(name).as_bytes());
    out.extend_from_slice(see_also_section(see_also).as_bytes());
    if has_version {
        man.render_version_section(&mut out)?;
    }
    Ok(out)
}

/// EXIT STATUS: every code of [`exit::TABLE`].
fn exit_status() -> String {
    let mut roff = String::from(".SH \"EXIT STATUS\"\n");
    for (code, meaning) in exit::TABLE {
        roff.push_str(&format!(".TP\n\\fB{code}\\fR\n{}\n", escape(meaning)));
    }
    roff
}

/// EXAMPLES for the page of `name` ("" for ferry.1): (what it does, the command).
fn examples(name: &str) -> String {
    const PUSH: [(&str, &str); 4] = [
        ("Push a file; a trailing / keeps its name.", "ferry push ./db.dump ferry://backup.example:7878/nightly/"),
        ("Push a tree, with a token, over TLS.", "ferry push /home/me ferry://backup.example/laptop/ --token-file laptop.token --tls-fingerprint sha256:HEX"),
        ("A long round trip: four connections share the file.", "ferry push ./vm.qcow2 ferry://far.example/images/ --streams 4"),
        ("The nightly cron line: one JSON line per run in the log.", "ferry push -q --json --max-duration 2h --bwlimit 20MiB /srv/backup/ ferry://backup.example/laptop/ >> /var/log/ferry-backup.jsonl 2>&1"),
    ];
    let list: &[(&str, &str)] = match name {
        "" => &[
            ("Receive into ./inbox on 127.0.0.1:7878.", "ferry serve --root ./inbox"),
            (
                "Push a file; a trailing / keeps its name.",
                "ferry push ./db.dump ferry://127.0.0.1:7878/nightly/",
            ),
            (
                "Pull it back into an existing directory.",
                "ferry pull ferry://127.0.0.1:7878/nightly/db.dump ./restore/",
            ),
            ("See a resumed, verified push through a flaky link.", "ferry demo"),
        ],
        "push" => &PUSH,
        "pull" => &[
            (
                "A file, into an existing directory.",
                "ferry pull ferry://backup.example/nightly/db.dump ./restore/",
            ),
            (
                "A tree, into ./laptop (new, empty, or an earlier pull of it).",
                "ferry pull ferry://backup.example/backups/laptop ./laptop",
            ),
        ],
        "serve" => &[
            (
                "Receive into ./inbox on loopback, without tokens.",
                "ferry serve --root ./inbox",
            ),
            (
                "Tokens, namespaces, TLS and limits from a file.",
                "ferry serve --config /etc/ferry/server.toml",
            ),
            (
                "Show the effective configuration and exit.",
                "ferry serve --config /etc/ferry/server.toml --print-config",
            ),
        ],
        "gc" => &[
            (
                "Expire what a stopped server left for a day.",
                "ferry gc --root /srv/ferry --older-than 1d",
            ),
            (
                "Prune this client's old records and cached manifests.",
                "ferry gc --client",
            ),
        ],
        "status" => &[
            ("This client's failed transfers.", "ferry status --failed"),
            (
                "Your open uploads on a server.",
                "ferry status --server ferry://backup.example --token-file laptop.token",
            ),
        ],
        "keygen" => &[(
            "A certificate for backup.example; clients pin the printed fingerprint.",
            "ferry keygen --cert /etc/ferry/cert.pem --key /etc/ferry/key.pem --name backup.example",
        )],
        "token" => &[(
            "A token for a laptop, its [[client]] entry appended to the server's configuration.",
            "ferry token laptop --out laptop.token >> /etc/ferry/server.toml",
        )],
        "demo" => &[("A smaller demo file.", "ferry demo --size 64MiB")],
        "completions" => &[(
            "Bash completion for this user.",
            "ferry completions bash > ~/.local/share/bash-completion/completions/ferry",
        )],
        "man" => &[
            ("Read the page of ferry itself.", "ferry man | man -l -"),
            (
                "Write every page into a directory.",
                "ferry man --out /usr/local/share/man/man1",
            ),
        ],
        _ => &[],
    };
    let mut roff = String::from(".SH EXAMPLES\n");
    for (what, command) in list {
        roff.push_str(&format!(
            ".PP\n{}\n.PP\n.RS 4\n.nf\n{}\n.fi\n.RE\n",
            escape(what),
            escape(command)
        ));
    }
    roff
}

/// SEE ALSO: the given pages, all in section 1.
fn see_also_section(pages: &[String]) -> String {
    let names: Vec<String> = pages.iter().map(|p| format!("\\fB{}\\fR(1)", escape(p))).collect();
    format!(".SH \"SEE ALSO\"\n{}\n", names.join(", "))
}

/// Text safe in a roff line: backslashes and hyphens escaped, a leading `.` or `'` neutralised.
fn escape(text: &str) -> String {
    let escaped = text.replace('\\', "\\e").replace('-', "\\-");
    if escaped.starts_with('.') || escaped.starts_with('\'') {
        format!("\\&{escaped}")
    } else {
        escaped
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
            errln!("ferry: {what}: writing to stdout: {e}");
            exit::LOCAL
        }
    }
}
