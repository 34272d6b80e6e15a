//! Configuration through the real binary: the client's file of defaults and remotes (`NAME:PATH`, precedence,
//! mistakes as usage errors), `ferry serve --print-config`, shell completions and man pages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use ferry::auth::Token;

use crate::util::*;

/// A ferry command that sees only the configuration a test gives it: HOME is a temp dir, and no FERRY_* or XDG_*
/// variable leaks in from the environment running the tests.
fn ferry(home: &Path) -> Command {
    let mut cmd = Command::new(ferry_bin());
    cmd.env("HOME", home)
        .env_remove("FERRY_CONFIG")
        .env_remove("FERRY_STATE")
        .env_remove("FERRY_TOKEN_FILE")
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("XDG_STATE_HOME")
        .stdin(Stdio::null());
    cmd
}

fn output(cmd: &mut Command) -> (i32, String, String) {
    let Output { status, stdout, stderr } = cmd.output().expect("run ferry");
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// A token-protected server (client "alice", namespace "alice") and a client home whose
/// `~/.config/ferry/config.toml` names it as `[remote.x]`, with the token file only in that section.
struct Site {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    home: PathBuf,
    server: TestServer,
}

impl Site {
    fn start() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let alice = Token::generate("alice").unwrap();
        let server_config = path.join("server.toml");
        std::fs::write(
            &server_config,
            format!(
                "[[client]]\nid = \"alice\"\nsecret = \"{}\"\nnamespace = \"alice\"\npermissions = [\"push\", \"pull\"]\n",
                alice.secret_hex()
            ),
        )
        .unwrap();
        let server = TestServer::start_with(&path.join("root"), &["--config", server_config.to_str().unwrap()]);
        let home = path.join("home");
        let config_dir = home.join(".config/ferry");
        std::fs::create_dir_all(&config_dir).unwrap();
        std::fs::write(config_dir.join("alice.token"), format!("{alice}\n")).unwrap();
        let client_config = format!(
            "[defaults]\nstate = \"~/state-from-defaults\"\nretry_delay = \"20ms\"\ntimeout = \"10s\"\nretries = 3\n\n\
             [remote.x]\nurl = \"ferry://{}/base\"\ntoken_file = \"alice.token\"   # relative to this file\n",
            server.addr
        );
        std::fs::write(config_dir.join("config.toml"), client_config).unwrap();
        Site {
            _dir: dir,
            dir: path,
            home,
            server,
        }
    }

    fn ferry(&self) -> Command {
        ferry(&self.home)
    }
}

#[tokio::test]
async fn a_remote_profile_gives_the_server_base_path_token_and_state() {
    let site = Site::start();
    let file = site.dir.join("f.bin");
    write_random(&file, 300 * KIB, 1);
    let mut push = site.ferry();
    push.arg("push").arg(&file).args(["x:dir/", "--json"]);
    let pushed = run(push).await;
    pushed.assert_ok();
    let landed = site.server.root.join("alice/base/dir/f.bin");
    assert_eq!(b3(&landed), b3(&file), "x:dir/ is base/dir/ in alice's namespace");
    assert_eq!(
        pushed.json["destination"],
        format!("ferry://{}/base/dir/f.bin", site.server.addr)
    );
    assert!(
        site.home.join("state-from-defaults").is_dir(),
        "[defaults] state (with ~) is the client state"
    );

    // Pulls take NAME:PATH too.
    let restored = site.dir.join("restored.bin");
    let mut pull = site.ferry();
    pull.args(["pull", "x:dir/f.bin"]).arg(&restored).arg("--json");
    run(pull).await.assert_ok();
    assert_eq!(b3(&restored), b3(&file));

    // The token belongs to [remote.x] only: the same server by URL gets no token, and the server refuses.
    let mut by_url = site.ferry();
    by_url
        .arg("push")
        .arg(&file)
        .arg(site.server.url("base/other.bin"))
        .arg("--json");
    let refused = run(by_url).await;
    assert_eq!(refused.code, 7, "no token outside the remote: {}", refused.stderr);
}

#[tokio::test]
async fn flags_override_the_file() {
    let site = Site::start();
    let file = site.dir.join("g.bin");
    write_random(&file, 64 * KIB, 2);
    let state = site.dir.join("state-from-flag");
    let mut push = site.ferry();
    push.arg("push")
        .arg(&file)
        .args(["x:", "--json", "--state"])
        .arg(&state);
    run(push).await.assert_ok();
    assert_eq!(
        b3(&site.server.root.join("alice/base")),
        b3(&file),
        "x: alone is the base path"
    );
    assert!(state.is_dir(), "--state wins over [defaults] state");
    assert!(!site.home.join("state-from-defaults").exists());

    // --client-config (and FERRY_CONFIG) replace the default file; a remote's section beats [defaults], a flag
    // beats both: the remote asks for 0 retries against a dead port, the flag for 1.
    let other = site.dir.join("other.toml");
    std::fs::write(
        &other,
        "[defaults]\nretries = 5\nretry_delay = \"10ms\"\ntimeout = \"2s\"\n\
         [remote.dead]\nurl = \"ferry://127.0.0.1:1/x\"\nretries = 0\n",
    )
    .unwrap();
    for (extra, attempts) in [(&[][..], 1), (&["--retries", "1"][..], 2)] {
        let mut push = site.ferry();
        push.arg("push")
            .arg(&file)
            .args(["dead:f", "--json", "--client-config"])
            .arg(&other)
            .args(extra);
        let failed = run(push).await;
        assert_eq!(failed.code, 3, "{}", failed.stderr);
        let message = failed.json["error"].as_str().unwrap_or_default().to_string();
        assert!(
            message.contains(&format!("gave up after {attempts} attempts")),
            "{extra:?}: {message}"
        );
    }
}

/// `status`, `gc --client` and `status --server` resolve their settings like push: the `[defaults] state` of the
/// configuration file (gc once pruned the XDG default store instead), and `--server NAME:` brings the remote's
/// URL, base path and token; an unknown remote is a usage error that names it.
#[tokio::test]
async fn status_and_gc_use_the_same_settings_as_push() {
    let site = Site::start();
    let file = site.dir.join("s.bin");
    write_random(&file, 64 * KIB, 3);
    let mut push = site.ferry();
    push.arg("push").arg(&file).args(["x:s.bin", "--json"]);
    run(push).await.assert_ok();
    let from_defaults = site.home.join("state-from-defaults");
    assert!(from_defaults.is_dir());

    let (code, stdout, stderr) = output(site.ferry().args(["status", "--json"]));
    assert_eq!(code, 0, "{stderr}");
    let listed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let transfers = listed["transfers"].as_array().unwrap();
    assert_eq!(transfers.len(), 1, "status reads the [defaults] state: {listed}");
    assert!(transfers[0]["destination"].as_str().unwrap().ends_with("/base/s.bin"));
    assert!(
        !site.home.join(".local/state/ferry").exists(),
        "nothing looked at the XDG default"
    );

    let (code, stdout, stderr) = output(site.ferry().args(["gc", "--client", "--json", "--older-than", "0s"]));
    assert_eq!(code, 0, "{stderr}");
    let pruned: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(pruned["state"], from_defaults.display().to_string(), "{pruned}");
    assert_eq!(pruned["report"]["records_removed"], 1, "{pruned}");
    // $FERRY_STATE beats the file, as for push.
    let env_state = site.dir.join("env-state");
    let (code, stdout, _) = output(
        site.ferry()
            .env("FERRY_STATE", &env_state)
            .args(["gc", "--client", "--json"]),
    );
    assert_eq!(code, 0);
    let pruned: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(pruned["state"], env_state.display().to_string(), "{pruned}");

    // The server requires a token, which only [remote.x] has: `x:` must bring it along.
    let (code, stdout, stderr) = output(site.ferry().args(["status", "--server", "x:", "--json"]));
    assert_eq!(code, 0, "{stdout}{stderr}");
    let partials: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        partials["server"],
        format!("ferry://{}", site.server.addr),
        "{partials}"
    );
    assert!(partials["partials"].as_array().unwrap().is_empty(), "{partials}");
    let by_url = format!("ferry://{}", site.server.addr);
    let (code, _, stderr) = output(site.ferry().args(["status", "--server", &by_url]));
    assert_eq!(code, 7, "the same server by URL gets no token: {stderr}");
    let (code, stdout, stderr) = output(site.ferry().args(["status", "--server", "nope:", "--json"]));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("unknown remote \"nope\""), "{stderr}");
    assert!(stdout.contains("\"exit_code\":2"), "{stdout}");
}

#[test]
fn configuration_mistakes_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("client.toml");
    let file = dir.path().join("f.bin");
    std::fs::write(&file, b"x").unwrap();
    std::fs::write(
        &config,
        "[remote.x]\nurl = \"ferry://127.0.0.1:1/base\"\ntokenfile = \"t\"\n",
    )
    .unwrap();
    let (code, _, stderr) = output(
        ferry(dir.path())
            .env("FERRY_CONFIG", &config)
            .arg("push")
            .arg(&file)
            .arg("x:dir/"),
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("unknown field `tokenfile`") && stderr.contains("client.toml"),
        "the key and the file are named: {stderr}"
    );

    std::fs::write(&config, "[remote.x]\nurl = \"ferry://127.0.0.1:1/base\"\n").unwrap();
    let (code, stdout, stderr) = output(
        ferry(dir.path())
            .env("FERRY_CONFIG", &config)
            .arg("push")
            .arg(&file)
            .args(["nope:dir/", "--json"]),
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("unknown remote \"nope\""), "{stderr}");
    assert!(stdout.contains("\"exit_code\":2"), "{stdout}");

    // $XDG_CONFIG_HOME/ferry/config.toml is the default file when it is set.
    let xdg = dir.path().join("xdg");
    std::fs::create_dir_all(xdg.join("ferry")).unwrap();
    std::fs::write(
        xdg.join("ferry/config.toml"),
        "[remote.x]\nurl = \"ferry://127.0.0.1:1/b\"\n",
    )
    .unwrap();
    let (code, _, stderr) = output(
        ferry(dir.path())
            .env("XDG_CONFIG_HOME", &xdg)
            .arg("push")
            .arg(&file)
            .arg("y:f"),
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("no [remote.y] section in") && stderr.contains("xdg/ferry/config.toml"),
        "{stderr}"
    );

    // No file at all: a remote name cannot mean anything.
    let (code, _, stderr) = output(ferry(dir.path()).args(["pull", "x:f"]).arg(dir.path().join("out")));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("no client configuration file"), "{stderr}");

    // A file named explicitly must exist; the default location may be missing.
    let missing = dir.path().join("missing.toml");
    let (code, _, stderr) = output(
        ferry(dir.path())
            .arg("push")
            .arg(&file)
            .arg("x:f")
            .arg("--client-config")
            .arg(&missing),
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("missing.toml"), "{stderr}");

    let (code, _, stderr) = output(ferry(dir.path()).arg("push").arg(&file).arg("http://h/x"));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("REMOTE:PATH"), "{stderr}");
}

#[test]
fn serve_print_config_merges_flags_and_hides_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let token = Token::generate("laptop").unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "root = \"inbox\"\nin_place = \"never\"\n[limits]\nmax_connections = 100\nmax_connections_per_client = 2\n\
             [[client]]\nid = \"laptop\"\nsecret = \"{}\"\nnamespace = \"laptop\"\npermissions = [\"push\"]\n",
            token.secret_hex()
        ),
    )
    .unwrap();
    let (code, stdout, stderr) = output(
        ferry(dir.path())
            .args(["serve", "--print-config", "--config"])
            .arg(&config)
            .args(["--max-connections", "7", "--partial-ttl", "2d"]),
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(!stdout.contains(&token.secret_hex()), "a secret was printed:\n{stdout}");
    let printed: toml::Table = toml::from_str(&stdout).unwrap_or_else(|e| panic!("not TOML: {e}\n{stdout}"));
    let limits = printed["limits"].as_table().unwrap();
    assert_eq!(limits["max_connections"].as_integer(), Some(7), "the flag wins");
    assert_eq!(
        limits["max_connections_per_client"].as_integer(),
        Some(2),
        "the file's value stays"
    );
    assert_eq!(limits["partial_ttl"].as_str(), Some("2d"));
    assert_eq!(limits["idle_timeout"].as_str(), Some("2m"), "a built-in default");
    assert_eq!(printed["listen"].as_str(), Some("127.0.0.1:7878"));
    assert_eq!(printed["in_place"].as_str(), Some("never"), "the file's in_place");
    assert_eq!(
        printed["root"].as_str().map(PathBuf::from),
        Some(dir.path().join("inbox"))
    );
    let client = &printed["client"].as_array().unwrap()[0];
    assert_eq!(client["id"].as_str(), Some("laptop"));
    assert_eq!(client["namespace"].as_str(), Some("laptop"));
    assert!(!dir.path().join("inbox").exists(), "printing does not start a server");
}

#[test]
fn completions_and_man_pages_are_generated() {
    let dir = tempfile::tempdir().unwrap();
    let (code, bash, stderr) = output(ferry(dir.path()).args(["completions", "bash"]));
    assert_eq!(code, 0, "{stderr}");
    assert!(bash.contains("ferry") && bash.contains("push") && bash.contains("--client-config"));
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let (code, script, _) = output(ferry(dir.path()).args(["completions", shell]));
        assert!(code == 0 && script.contains("push"), "{shell}");
    }
    let (code, _, _) = output(ferry(dir.path()).args(["completions", "tcsh"]));
    assert_eq!(code, 2);

    let (code, page, stderr) = output(ferry(dir.path()).arg("man"));
    assert_eq!(code, 0, "{stderr}");
    let header = page.lines().find(|l| l.starts_with(".TH"));
    assert!(header.is_some_and(|h| h.starts_with(".TH ferry 1")), "{page}");
    assert!(page.contains("push"));

    let out = dir.path().join("man1");
    let (code, _, stderr) = output(ferry(dir.path()).arg("man").arg("--out").arg(&out));
    assert_eq!(code, 0, "{stderr}");
    for name in ["ferry.1", "ferry-push.1", "ferry-pull.1", "ferry-serve.1"] {
        let page = std::fs::read_to_string(out.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(page.contains(".TH"), "{name}");
    }
}

/// XDG base directories: an empty `$XDG_STATE_HOME` falls back to `$HOME/.local/state/ferry` (it used to make
/// `./ferry` in the current directory), and with a relative one and no `$HOME` the push stops with a usage error
/// naming both variables instead of writing state under `./.local/state/ferry`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_directory_follows_the_xdg_rules_and_never_lands_in_the_current_directory() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let src = dir.path().join("f.bin");
    write_random(&src, 10_000, 5);
    let (home, cwd) = (dir.path().join("home"), dir.path().join("cwd"));
    std::fs::create_dir_all(&cwd).unwrap();
    let url = server.url("f.bin");

    let mut push = ferry(&home);
    push.current_dir(&cwd)
        .env("XDG_STATE_HOME", "")
        .args(["push", src.to_str().unwrap(), &url, "--json", "-q"]);
    let (code, stdout, stderr) = output(&mut push);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(home.join(".local/state/ferry").is_dir(), "state under $HOME");
    assert_eq!(
        std::fs::read_dir(&cwd).unwrap().count(),
        0,
        "nothing in the current directory"
    );

    let mut push = ferry(&home);
    push.current_dir(&cwd)
        .env_remove("HOME")
        .env("XDG_STATE_HOME", "relative/state")
        .args(["push", src.to_str().unwrap(), &url, "--json", "-q"]);
    let (code, stdout, stderr) = output(&mut push);
    assert_eq!(code, i32::from(ferry::exit::USAGE), "{stdout}{stderr}");
    assert!(
        stdout.contains("$XDG_STATE_HOME is relative and $HOME is unset") && stdout.contains("--state"),
        "{stdout}{stderr}"
    );
    assert_eq!(
        std::fs::read_dir(&cwd).unwrap().count(),
        0,
        "nothing in the current directory"
    );
}
