//! `ferry status`: the client's transfers from its state store (a table, or one JSON object), or with `--server`
//! the caller's partial uploads on a server. Local listing needs no server; it needs the store, which sled lets one
//! process hold at a time, so it is refused with a clear message while a push or pull runs with it.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::{client_state_dir, printable, AccessArgs};
use crate::client::{
    local_transfers, read_running, server_partials, Direction, StatusOptions, TransferState, TransferStatus,
};
use crate::config::Profile;
use crate::demo::human;
use crate::settings::{Location, Request};
use crate::store::{now_secs, StoreError};
use crate::units::parse_duration;
use crate::wire::Partials;

/// `ferry status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Client state directory (default as for push: $FERRY_STATE, else the client configuration's `state`, else
    /// $XDG_STATE_HOME/ferry or ~/.local/state/ferry).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Client configuration file (default as for push: $FERRY_CONFIG, else $XDG_CONFIG_HOME/ferry/config.toml or
    /// ~/.config/ferry/config.toml, which may be missing): its `state`, and for --server NAME: its remotes.
    #[arg(long, env = "FERRY_CONFIG", value_name = "FILE")]
    pub client_config: Option<PathBuf>,
    /// List your partial (uncommitted) uploads on this server instead: ferry://HOST[:PORT][/PATH], or NAME:[PATH]
    /// under a remote of the client configuration (with its token and TLS settings); a path keeps only the
    /// partials at or under it.
    #[arg(long, value_parser = parse_server)]
    pub server: Option<Location>,
    /// Only failed transfers.
    #[arg(long, conflicts_with_all = ["active", "server"])]
    pub failed: bool,
    /// Only unfinished transfers (interrupted pushes, partial pulls).
    #[arg(long)]
    pub active: bool,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// With --server: token and TLS, as for push.
    #[command(flatten)]
    pub access: AccessArgs,
    /// With --server: give up when the server does not answer for this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
}

fn parse_server(raw: &str) -> Result<Location, String> {
    Location::parse_server(raw).map_err(|e| e.to_string())
}

/// Runs `ferry status`; returns the exit code.
pub async fn status(args: StatusArgs) -> u8 {
    match &args.server {
        Some(server) => remote(&args, server.clone()).await,
        None => local(&args).await,
    }
}

async fn local(args: &StatusArgs) -> u8 {
    let dir = match client_state_dir(args.client_config.as_deref(), args.state.clone()) {
        Ok(dir) => dir,
        Err(e) => return fail(args.json, crate::exit::USAGE, &e.to_string()),
    };
    let read = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || local_transfers(&dir)).await
    };
    let mut transfers = match read {
        Ok(Ok(transfers)) => transfers,
        Ok(Err(StoreError::Locked(_))) => match read_running(&dir) {
            // The records stay unreadable until the run ends; what it is doing is in its progress file.
            Some(running) => vec![TransferStatus::from(running)],
            None => {
                let message = format!(
                    "a ferry run holds the state directory {} and has published no progress (it is starting, or \
                     it is not a push or pull); its records can be read when it ends (sled admits one process)",
                    dir.display()
                );
                return fail(args.json, crate::exit::ALREADY_RUNNING, &message);
            }
        },
        Ok(Err(e)) => return fail(args.json, crate::exit::LOCAL, &e.to_string()),
        Err(e) => return fail(args.json, crate::exit::INTERNAL, &e.to_string()),
    };
    transfers.retain(|t| match (args.failed, args.active) {
        (true, _) => t.state == TransferState::Failed,
        (_, true) => matches!(t.state, TransferState::Interrupted | TransferState::Running),
        _ => true,
    });
    if args.json {
        let listed: Vec<_> = transfers.iter().map(transfer_json).collect();
        outln!(
            "{}",
            serde_json::json!({ "status": "ok", "exit_code": crate::exit::OK, "transfers": listed })
        );
    } else if transfers.is_empty() {
        outln!("no transfers recorded in {}", dir.display());
    } else {
        out!("{}", transfer_table(&transfers, now_secs()));
    }
    crate::exit::OK
}

async fn remote(args: &StatusArgs, server: Location) -> u8 {
    let flags = Profile {
        state: args.state.clone(),
        token_file: args.access.token_file.clone(),
        tls: args.access.tls(),
        ..Profile::default()
    };
    let resolved = crate::settings::resolve_command(Request {
        config: args.client_config.as_deref(),
        location: Some(&server),
        bare: true,
        flags,
    })
    .and_then(|(url, settings)| Ok((url, settings.access()?)));
    let (server, access) = match resolved {
        Ok((Some(url), access)) => (url, access),
        Ok((None, _)) => {
            return fail(
                args.json,
                crate::exit::INTERNAL,
                "the server location resolved to no URL",
            )
        }
        Err(e) => return fail(args.json, crate::exit::USAGE, &e.to_string()),
    };
    let opts = StatusOptions {
        server,
        access,
        connect_timeout: args.timeout.min(Duration::from_secs(10)),
        io_timeout: args.timeout,
    };
    match server_partials(&opts).await {
        Ok(partials) => {
            let url = format!("ferry://{}", opts.server.authority());
            if args.json {
                outln!("{}", partials_json(&partials, &url));
            } else {
                out!("{}", partials_table(&partials, &url, now_secs()));
            }
            crate::exit::OK
        }
        Err(e) => fail(
            args.json,
            e.exit_code(),
            &format!("listing partial transfers failed: {e}"),
        ),
    }
}

fn fail(json: bool, code: u8, message: &str) -> u8 {
    if json {
        outln!(
            "{}",
            serde_json::json!({ "status": "error", "exit_code": code, "error": message })
        );
    }
    errln!("ferry: status: {}", printable(message));
    code
}

fn state_name(state: TransferState) -> &'static str {
    match state {
        TransferState::Done => "done",
        TransferState::Failed => "failed",
        TransferState::Interrupted => "interrupted",
        TransferState::Running => "running",
    }
}

fn direction_name(direction: Direction) -> &'static str {
    match direction {
        Direction::Push => "push",
        Direction::Pull => "pull",
    }
}

/// One transfer in `ferry status --json` (README, "ferry status").
pub fn transfer_json(t: &TransferStatus) -> serde_json::Value {
    serde_json::json!({
        "kind": direction_name(t.direction),
        "state": state_name(t.state),
        "source": t.source,
        "destination": t.destination,
        "size": t.size,
        "bytes": t.bytes,
        "acked": t.acked,
        "last_error": t.last_error,
        "started": t.started,
        "updated": t.updated,
    })
}

/// `ferry status --server URL --json`.
pub fn partials_json(partials: &Partials, server: &str) -> serde_json::Value {
    let listed: Vec<_> = partials
        .entries
        .iter()
        .map(|e| {
            serde_json::json!({
                "path": e.path,
                "size": e.size,
                "received": e.received,
                "created": e.created,
                "updated": e.updated,
            })
        })
        .collect();
    serde_json::json!({
        "status": "ok",
        "exit_code": crate::exit::OK,
        "server": server,
        "partials": listed,
        "total": partials.total,
        "truncated": partials.truncated,
    })
}

/// The human table of local transfers, newest first.
fn transfer_table(transfers: &[TransferStatus], now: u64) -> String {
    let rows: Vec<[String; 6]> = transfers
        .iter()
        .map(|t| {
            [
                state_name(t.state).to_string(),
                direction_name(t.direction).to_string(),
                format!("{} / {}", human(t.acked.unwrap_or(t.bytes)), human(t.size)),
                age(now, t.updated),
                printable(&t.destination),
                printable(t.last_error.as_deref().unwrap_or_default()),
            ]
        })
        .collect();
    table(
        ["STATE", "KIND", "BYTES", "UPDATED", "DESTINATION", "LAST ERROR"],
        &rows,
    )
}

/// The human table of a server's partials.
fn partials_table(partials: &Partials, server: &str, now: u64) -> String {
    if partials.entries.is_empty() && partials.total == 0 {
        return format!("no partial transfers of yours on {server}\n");
    }
    let rows: Vec<[String; 5]> = partials
        .entries
        .iter()
        .map(|e| {
            let percent = (e.received.saturating_mul(100)).checked_div(e.size).unwrap_or(100);
            [
                printable(&e.path),
                format!("{} / {}", human(e.received), human(e.size)),
                format!("{percent}%"),
                age(now, e.created),
                age(now, e.updated),
            ]
        })
        .collect();
    let mut out = table(["PATH", "RECEIVED", "DONE", "CREATED", "UPDATED"], &rows);
    if partials.truncated {
        out.push_str(&format!(
            "(showing {} of {} partial transfers; the server lists at most {} in one reply, fewer when their paths \
             are long)\n",
            partials.entries.len(),
            partials.total,
            crate::MAX_LISTED_PARTIALS
        ));
    }
    out
}

/// Left-aligned columns separated by two spaces; trailing blanks trimmed.
fn table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header = header.map(str::to_string);
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(widths) {
            line.push_str(&format!("{cell:<width$}  "));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// "just now", "42s ago", "3m ago", "5h ago", "2d ago".
fn age(now: u64, then: u64) -> String {
    let secs = now.saturating_sub(then);
    match secs {
        0..=4 => "just now".to_string(),
        5..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86_399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::PartialEntry;

    #[test]
    fn ages_read_naturally() {
        assert_eq!(age(100, 100), "just now");
        assert_eq!(
            age(100, 200),
            "just now",
            "a clock that went back is not a negative age"
        );
        assert_eq!(age(100, 58), "42s ago");
        assert_eq!(age(1000, 1000 - 3 * 60 - 5), "3m ago");
        assert_eq!(age(100_000, 100_000 - 5 * 3600), "5h ago");
        assert_eq!(age(1_000_000, 1_000_000 - 2 * 86_400), "2d ago");
    }

    #[test]
    fn the_local_table_names_state_bytes_destination_and_error() {
        let failed = TransferStatus {
            direction: Direction::Push,
            state: TransferState::Failed,
            source: Some("/data/a".into()),
            destination: "ferry://h:1/a".into(),
            size: 2048,
            bytes: 1024,
            acked: None,
            last_error: Some("gave up after 1 attempts: connection refused".into()),
            started: 10,
            updated: 1000 - 180,
        };
        let table = transfer_table(&[failed], 1000);
        let lines: Vec<_> = table.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("STATE   KIND  BYTES"), "{table}");
        assert!(
            lines[1].starts_with("failed  push  1.0 KiB / 2.0 KiB  3m ago   ferry://h:1/a"),
            "{table}"
        );
        assert!(lines[1].ends_with("connection refused"), "{table}");
    }

    #[test]
    fn the_partials_table_says_when_the_list_is_cut() {
        let partials = Partials {
            entries: vec![PartialEntry {
                path: "big.iso".into(),
                size: 4 << 20,
                received: 1 << 20,
                created: 0,
                updated: 0,
            }],
            total: 2,
            truncated: true,
        };
        let table = partials_table(&partials, "ferry://h:1", 0);
        assert!(table.contains("big.iso  1.0 MiB / 4.0 MiB  25%"), "{table}");
        assert!(table.contains("showing 1 of 2"), "{table}");
        assert_eq!(printable("a\x1b[2Jb\n"), "a?[2Jb?");
        assert_eq!(
            partials_table(&Partials::default(), "ferry://h:1", 0),
            "no partial transfers of yours on ferry://h:1\n"
        );
    }
}
