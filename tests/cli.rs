//! The README quick start, run for real: `tollgate serve --dev` as a child process (it
//! starts its own redis-server), then `tollgate admin grant` / `balance` / `lots` from
//! "a second terminal". Also: config errors are reported all at once with their paths;
//! the money commands (`grant --idempotency-key`, `adjust`, `refund`) and the `admin org`
//! commands' `--idempotency-key` against a server in this process, their bad arguments
//! named as typed; `serve --help`'s defaults.

mod common;

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A `tollgate serve` child: SIGTERM on drop (so it stops its redis-server), then SIGKILL.
struct Serve {
    child: Child,
}

impl Serve {
    /// SIGTERM, then its exit status (None if it has not exited within 20 s).
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Far longer than a refused config takes to be reported, even on a busy machine.
const SERVE_REFUSES_WITHIN: Duration = Duration::from_secs(60);

fn admin(grpc_port: u16, args: &[&str]) -> Output {
    common::output_within(
        common::tollgate()
            .arg("admin")
            .arg(format!("--server=http://127.0.0.1:{grpc_port}"))
            .args(args),
        common::COMMAND_TIMEOUT,
    )
}

/// `tollgate serve --dev` on free ports, answering: its first grant's output and its gRPC
/// port. A port picked free may be taken before the server binds it (tests run in
/// parallel): the server then exits, and starts again on other ports. Its stderr goes to a
/// file, shown if it never answers. `tmpdir` is its temp directory (`TMPDIR`).
fn serve_dev_and_grant(grant: &[&str], tmpdir: &std::path::Path) -> (Serve, u16, Output) {
    serve_dev_with_env_and_grant(grant, tmpdir, &[])
}

/// [`serve_dev_and_grant`] with these variables in the server's environment.
fn serve_dev_with_env_and_grant(
    grant: &[&str],
    tmpdir: &std::path::Path,
    env: &[(&str, &str)],
) -> (Serve, u16, Output) {
    let deadline = Instant::now() + common::START_TIMEOUT;
    let mut exits = Vec::new();
    loop {
        let grpc_port = common::free_port();
        let http_port = common::free_port();
        let stderr = common::temp_path("stderr");
        let mut serve = Serve {
            child: common::tollgate()
                .args(["serve", "--dev"])
                .env("TMPDIR", tmpdir)
                .envs(env.iter().copied())
                .arg(format!("--grpc-addr=127.0.0.1:{grpc_port}"))
                .arg(format!("--http-addr=127.0.0.1:{http_port}"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&stderr).expect("stderr file"))
                .spawn()
                .expect("start tollgate serve --dev"),
        };
        // Wait (generously) until the server answers.
        loop {
            let exited = matches!(serve.child.try_wait(), Ok(Some(_)));
            let out = admin(grpc_port, grant);
            if out.status.success() && !exited {
                return (serve, grpc_port, out);
            }
            if exited {
                exits.push(common::read_lossy(&stderr));
            }
            assert!(
                Instant::now() < deadline,
                "serve --dev never answered: {out:?}\nits stderr:\n{}\nearlier tries that exited:\n{}",
                common::read_lossy(&stderr),
                exits.join("\n")
            );
            if exited {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `serve --dev` with its private Redis pairs it with a fresh ledger file, also when a
/// config or the environment names a store: it used to migrate that store (and, with
/// `server.restore`, restore it into the throwaway Redis, raising its shards' fences).
#[test]
fn dev_server_leaves_a_configured_store_alone() {
    let tmpdir = common::temp_path("tmp");
    std::fs::create_dir_all(&tmpdir).expect("temp dir");
    let configured = tmpdir.join("configured.db");
    let url = format!("sqlite://{}", configured.display());
    let (mut serve, _, grant) = serve_dev_with_env_and_grant(
        &["grant", "alice", "100"],
        &tmpdir,
        &[("TOLLGATE_STORE__URL", url.as_str())],
    );
    assert!(grant.status.success(), "{grant:?}");
    assert!(serve.stop().is_some(), "serve --dev did not stop");
    assert!(!configured.exists(), "the configured store was opened");
    let _ = std::fs::remove_dir_all(&tmpdir);
}

#[test]
fn dev_server_then_admin_grant_and_balance() {
    let tmpdir = common::temp_path("tmp");
    std::fs::create_dir_all(&tmpdir).expect("temp dir");
    let (mut serve, grpc_port, grant) =
        serve_dev_and_grant(&["grant", "alice", "100", "--description", "pack"], &tmpdir);
    let text = String::from_utf8_lossy(&grant.stdout);
    assert!(grant.status.success(), "grant failed: {grant:?}");
    assert!(text.contains("available 100"), "{text}");

    let out = admin(
        grpc_port,
        &[
            "grant",
            "alice",
            "25",
            "--kind",
            "promo",
            "--priority",
            "10",
        ],
    );
    assert!(out.status.success(), "{out:?}");

    let balance = admin(grpc_port, &["balance", "alice"]);
    assert!(balance.status.success(), "{balance:?}");
    let text = String::from_utf8_lossy(&balance.stdout);
    let row = text
        .lines()
        .find(|l| l.starts_with("default"))
        .unwrap_or_else(|| panic!("no default wallet row in {text}"));
    let numbers: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(numbers[1..4], ["125", "0", "125"], "{text}");

    let lots = admin(grpc_port, &["lots", "alice"]);
    let text = String::from_utf8_lossy(&lots.stdout);
    let promo = text
        .lines()
        .position(|l| l.contains("promo"))
        .expect("promo lot");
    let purchase = text
        .lines()
        .position(|l| l.contains("purchase"))
        .expect("purchase lot");
    assert!(promo < purchase, "priority 10 burns first:\n{text}");

    // Bad input: typed error naming the argument (as clap names it), nothing granted.
    let bad = admin(grpc_port, &["grant", "alice", "0"]);
    assert!(!bad.status.success());
    let said = String::from_utf8_lossy(&bad.stderr);
    assert!(said.contains("InvalidArgument: <AMOUNT>"), "{bad:?}");
    assert!(
        !said.contains("invalid argument"),
        "the code said twice: {said}"
    );
    // An account nothing was granted to says so, instead of an empty table.
    let nobody = admin(grpc_port, &["balance", "nobody"]);
    assert!(nobody.status.success(), "{nobody:?}");
    assert!(
        String::from_utf8_lossy(&nobody.stdout).contains("(no wallet"),
        "{nobody:?}"
    );
    let again = admin(grpc_port, &["balance", "alice"]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("125"));

    // API keys: made (secret printed once), listed (without it), revoked.
    let made = admin(grpc_port, &["create-key", "alice", "--name", "laptop"]);
    assert!(made.status.success(), "{made:?}");
    let text = String::from_utf8_lossy(&made.stdout).to_string();
    let api_key = text
        .lines()
        .find(|l| l.starts_with("tg_"))
        .unwrap_or_else(|| panic!("no key in {text}"));
    let key_id = api_key.split('_').nth(1).expect("key id");
    let listed = admin(grpc_port, &["keys", "alice"]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(text.contains(key_id) && text.contains("laptop"), "{text}");
    // A personal key has no member ("-" in the member column).
    let row: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with(key_id))
        .unwrap_or_else(|| panic!("no row for {key_id} in {text}"))
        .split_whitespace()
        .collect();
    assert!(
        text.lines().next().is_some_and(|h| h.contains("member")),
        "{text}"
    );
    // Nor a maker (an owner or admin makes org keys only).
    assert_eq!(row[3..], ["-", "-", "laptop"], "{text}");
    assert!(!text.contains(api_key), "secrets are never listed: {text}");
    let revoked = admin(grpc_port, &["revoke-key", key_id]);
    assert!(revoked.status.success(), "{revoked:?}");
    assert!(String::from_utf8_lossy(&revoked.stdout).contains("revoked"));

    // A wrong token is refused.
    let out = common::output_within(
        common::tollgate()
            .args([
                "admin",
                &format!("--server=http://127.0.0.1:{grpc_port}"),
                "--token",
                "nope",
            ])
            .args(["balance", "alice"]),
        common::COMMAND_TIMEOUT,
    );
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("Unauthenticated"), "{out:?}");
    assert!(said.contains("--token or TOLLGATE_ADMIN_TOKEN"), "{out:?}");

    // The dev ledger lives in the temp directory, named after the process, and goes with
    // it on a clean exit (its private redis-server's data goes too).
    let dev_files = || -> Vec<String> {
        std::fs::read_dir(&tmpdir)
            .expect("temp dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("tollgate-dev-"))
            .collect()
    };
    let ledger_file = format!("tollgate-dev-{}.db", serve.child.id());
    assert!(dev_files().contains(&ledger_file), "{:?}", dev_files());
    let stopped = serve.stop();
    assert!(
        stopped.is_some_and(|s| s.success()),
        "a clean exit: {stopped:?}"
    );
    assert_eq!(
        dev_files(),
        Vec::<String>::new(),
        "the dev ledger is removed"
    );
}

#[test]
fn config_errors_are_reported_together_with_paths() {
    let dir = std::env::temp_dir().join(format!("tollgate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "[server]\ngrpc_addr = \"nope\"\n[ledger]\nshards = 0\nmystery = 1\n",
    )
    .expect("write");
    // Nothing of the machine's defaults: were the config taken, the server would fail to
    // reach this Redis rather than use one on the default port, and `output_within` ends
    // it (the file's own bad `server.grpc_addr` is left to be reported).
    let out = common::output_within(
        common::tollgate()
            .args(["serve", "--config"])
            .arg(&path)
            .args(["--redis-url", "redis://127.0.0.1:1"])
            .arg(format!("--store={}", common::temp_sqlite_url()))
            .arg(format!("--http-addr=127.0.0.1:{}", common::free_port())),
        SERVE_REFUSES_WITHIN,
    );
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    for path in ["server.grpc_addr", "ledger.shards", "ledger.mystery"] {
        assert!(err.contains(path), "{path} missing in: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A variable whose value is not UTF-8 does not stop a command: an unrelated one is not
/// looked at, a `TOLLGATE_` one is a config error naming the variable, never its value
/// (it may be a token). `std::env::vars()` panicked on either and printed the value.
#[test]
fn a_variable_that_is_not_utf8_is_named_not_printed() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    // A directory of its own, without a tollgate.toml for check-config to pick up.
    let dir = std::env::temp_dir().join(format!("tollgate-cli-env-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let run = |name: &str, value: &[u8]| {
        common::output_within(
            common::tollgate()
                .args(["check-config"])
                .current_dir(&dir)
                .env("TOLLGATE_ADMIN_TOKEN", "admin-secret")
                .env("TOLLGATE_SERVICE_TOKEN", "service-secret")
                .env(name, OsStr::from_bytes(value)),
            common::COMMAND_TIMEOUT,
        )
    };
    let out = run("UNRELATED", b"x\xffy");
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("config ok"),
        "{out:?}"
    );
    let out = run("TOLLGATE_ADMIN_TOKEN", b"sekr1t-\xff-tail");
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(
        out.status.code(),
        Some(1),
        "a config error, not a panic: {out:?}"
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("TOLLGATE_ADMIN_TOKEN") && said.contains("not UTF-8"),
        "{out:?}"
    );
    assert!(
        !said.contains("sekr1t") && !said.contains("tail") && !said.contains("\\xff"),
        "the value is printed: {said}"
    );
}

/// `check-config` holds a config to what `serve` requires: a config without the tokens
/// is refused (serve would not start), and accepted once the environment gives them.
#[test]
fn check_config_requires_what_serve_requires() {
    let dir = std::env::temp_dir().join(format!("tollgate-cli-tokens-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("tollgate.toml");
    std::fs::write(&path, "[ledger]\nshards = 16\n").expect("write");
    let run = |tokens: &[(&str, &str)]| {
        common::output_within(
            common::tollgate()
                .args(["check-config", "--config"])
                .arg(&path)
                .env_remove("TOLLGATE_ADMIN_TOKEN")
                .env_remove("TOLLGATE_SERVICE_TOKEN")
                .envs(tokens.iter().copied()),
            common::COMMAND_TIMEOUT,
        )
    };
    let out = run(&[]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("auth.admin_token"),
        "{out:?}"
    );
    let out = run(&[
        ("TOLLGATE_ADMIN_TOKEN", "admin-secret"),
        ("TOLLGATE_SERVICE_TOKEN", "service-secret"),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("config ok"),
        "{out:?}"
    );
    // The shipped dev price book: refused as a production config, fine for `serve --dev`.
    let esign = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/pricebook-esign.toml");
    let check = |dev: bool| {
        common::output_within(
            common::tollgate()
                .args(["check-config", "--config", esign])
                .args(dev.then_some("--dev"))
                .env_remove("TOLLGATE_ADMIN_TOKEN")
                .env_remove("TOLLGATE_SERVICE_TOKEN"),
            common::COMMAND_TIMEOUT,
        )
    };
    let out = check(false);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--dev"),
        "{out:?}"
    );
    let out = check(true);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("config ok") && said.contains("dev tokens"),
        "{out:?}"
    );
    assert!(
        !said.contains(": 0 price book"),
        "the book was read: {out:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `tollgate admin org …` and the org flags of `create-key` / `balance`, against a server
/// in this process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_commands() {
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(
        common::test_config(&redis.url()),
        tollgate::ledger::Clock::Redis,
    )
    .await;
    let port = server.grpc_addr.port();
    let run = |args: &[&str]| {
        let mut all = vec!["--token", common::ADMIN_TOKEN];
        all.extend_from_slice(args);
        let out = admin(port, &all);
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&["org", "create", "acme", "olivia"]);
    run(&["org", "add-member", "acme", "alice", "--actor", "olivia"]);
    run(&["grant", "acme", "1000"]);
    let allocated = run(&[
        "org", "allocate", "acme", "alice", "300", "--actor", "olivia",
    ]);
    assert!(allocated.contains("300 allocated"), "{allocated}");
    let more = run(&[
        "org", "allocate", "acme", "alice", "-50", "--add", "--actor", "olivia",
    ]);
    assert!(more.contains("250 allocated"), "{more}");
    let members = run(&["org", "members", "acme"]);
    assert!(
        members.contains("alice") && members.contains("member"),
        "{members}"
    );
    assert!(
        members.contains("olivia") && members.contains("owner"),
        "{members}"
    );
    let said = admin_refused(&server, &["org", "members", "acmee"]);
    assert!(
        said.contains("NotFound: acmee is not an organization (<ORG>)"),
        "{said}"
    );
    let budget = run(&["org", "budget", "acme", "100", "--member", "alice"]);
    assert!(budget.contains("100 per day"), "{budget}");
    let key = run(&[
        "create-key",
        "acme",
        "--org",
        "acme",
        "--member",
        "alice",
        "--actor",
        "olivia",
    ]);
    assert!(key.contains("as member alice"), "{key}");
    let balance = run(&["balance", "acme", "--member", "alice"]);
    assert!(balance.contains("organization"), "{balance}");
    assert!(balance.contains("250 remaining"), "{balance}");
    assert!(balance.contains("0 of 100 per day"), "{balance}");
    // A member's view: what the member may spend (the budget's 100 is tighter than the
    // 250 left of the allocation), never the org's totals, which the answer leaves at 0
    // and a full table printed as the org's (granted 0, used 0).
    let row: Vec<&str> = balance
        .lines()
        .find(|l| l.starts_with("default "))
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(row, ["default", "250", "100"], "{balance}");
    assert!(!balance.contains("granted"), "{balance}");
    let owner = run(&["balance", "acme", "--member", "olivia"]);
    assert!(
        !owner.contains("spendable"),
        "nothing bounds the owner: {owner}"
    );
    assert!(
        owner.contains("allocation default: none (spends the org's balance), 0 used"),
        "an owner has no allocation, not an allocation of 0: {owner}"
    );
    // A member may not make org keys: the field is named and the command fails.
    let refused = admin(
        port,
        &[
            "--token",
            common::ADMIN_TOKEN,
            "create-key",
            "acme",
            "--org",
            "acme",
            "--actor",
            "alice",
        ],
    );
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("InvalidArgument: --actor: "), "{refused:?}");
    assert!(!said.contains("actor_id:"), "{refused:?}");
}

/// `org members` follows ListMembers' pages: an org of more members than one page
/// (100 by default) is listed whole, in member id order, each member once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_members_lists_every_page() {
    let redis = common::RedisServer::start();
    let server = test_server(&redis).await;
    server
        .ledger
        .create_org("big", "owner", "create")
        .await
        .expect("create");
    let mut expected = vec!["owner".to_owned()];
    for i in 0..150 {
        let member = format!("m{i:03}");
        server
            .ledger
            .add_member("big", "owner", &member, "member", &format!("add-{member}"))
            .await
            .expect("add");
        expected.push(member);
    }
    expected.sort();
    let listed: Vec<String> = admin_ok(&server, &["org", "members", "big"])
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(listed, expected);
    server.stop().await;
}

/// A member's allocation of an org's default wallet, read from the ledger.
async fn allocated(server: &common::TestServer, org: &str, member: &str) -> i64 {
    server
        .ledger
        .view(org, member, "default")
        .await
        .expect("view")
        .allocations
        .iter()
        .find(|a| a.wallet == "default")
        .map_or(0, |a| a.allocated)
}

/// `admin org allocate --add --idempotency-key`: re-running the same command (as after a
/// timeout) replays the first answer, says so, and adds once; without a key, each run adds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_allocate_with_an_idempotency_key_adds_once() {
    let redis = common::RedisServer::start();
    let server = test_server(&redis).await;
    let run = |args: &[&str]| admin_ok(&server, args);
    let refused = |args: &[&str]| admin_refused(&server, args);
    run(&["org", "create", "acme", "olivia"]);
    run(&["org", "add-member", "acme", "alice", "--actor", "olivia"]);
    run(&["org", "add-member", "acme", "bob", "--actor", "olivia"]);

    let add = [
        "org",
        "allocate",
        "acme",
        "alice",
        "100",
        "--add",
        "--actor",
        "olivia",
        "--idempotency-key",
        "alloc-1",
    ];
    let first = run(&add);
    assert!(
        first.starts_with("alice in acme (default): 100 allocated"),
        "{first}"
    );
    assert!(!first.contains("replayed"), "{first}");
    let again = run(&add);
    assert!(again.starts_with("replayed"), "{again}");
    // The first answer, verbatim (same allocation, same event).
    let answer = |text: &str| {
        text.split_once("alice in acme")
            .map(|(_, rest)| rest.trim().to_owned())
            .unwrap_or_else(|| panic!("no allocation in {text}"))
    };
    assert_eq!(answer(&again), answer(&first));
    assert_eq!(allocated(&server, "acme", "alice").await, 100, "added once");
    // The same key with other arguments is refused, and changes nothing.
    let mut other = add;
    other[4] = "5";
    let said = refused(&other);
    assert!(said.contains("idempotency key reused"), "{said}");
    assert_eq!(allocated(&server, "acme", "alice").await, 100);

    // Without a key, each run adds.
    for _ in 0..2 {
        let out = run(&[
            "org", "allocate", "acme", "bob", "100", "--add", "--actor", "olivia",
        ]);
        assert!(!out.contains("replayed"), "{out}");
    }
    assert_eq!(allocated(&server, "acme", "bob").await, 200, "added twice");

    // Bad input: named as the command line names it; nothing changed.
    let said = refused(&[
        "org", "allocate", "acme", "alice", "0", "--add", "--actor", "olivia",
    ]);
    assert!(said.contains("InvalidArgument: <AMOUNT>: "), "{said}");
    let said = refused(&[
        "org", "allocate", "acme", "alice", "5", "--add", "--actor", "bob",
    ]);
    assert!(said.contains("InvalidArgument: --actor: "), "{said}");
    assert!(!said.contains("actor_id"), "{said}");
    assert_eq!(allocated(&server, "acme", "alice").await, 100);
}

/// `admin org create` and `remove-member` under an idempotency key: a re-run replays the
/// first answer and says so; without a key, the re-run is a second call, refused (the org
/// exists; the member is gone). A bad budget argument is named as its flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_create_and_remove_member_with_an_idempotency_key_replay() {
    let redis = common::RedisServer::start();
    let server = test_server(&redis).await;
    let run = |args: &[&str]| admin_ok(&server, args);
    let refused = |args: &[&str]| admin_refused(&server, args);

    let create = [
        "org",
        "create",
        "acme",
        "olivia",
        "--idempotency-key",
        "org-1",
    ];
    let first = run(&create);
    assert!(
        first.starts_with("organization acme created, owner olivia (event "),
        "{first}"
    );
    let again = run(&create);
    assert_eq!(
        again,
        format!(
            "replayed (an earlier call with this idempotency key got this answer; nothing \
             changed now): {first}"
        )
    );
    run(&["org", "create", "globex", "olivia"]);
    let said = refused(&["org", "create", "globex", "olivia"]);
    assert!(said.contains("AlreadyExists: "), "{said}");

    run(&["org", "add-member", "acme", "alice", "--actor", "olivia"]);
    let remove = [
        "org",
        "remove-member",
        "acme",
        "alice",
        "--actor",
        "olivia",
        "--idempotency-key",
        "rm-1",
    ];
    let first = run(&remove);
    assert!(
        first.starts_with("alice removed from acme (event "),
        "{first}"
    );
    let again = run(&remove);
    assert!(again.starts_with("replayed"), "{again}");
    assert!(again.ends_with(&first), "{again}");
    // Re-added since: the replay of the earlier removal does not remove them again.
    run(&["org", "add-member", "acme", "alice", "--actor", "olivia"]);
    let again = run(&remove);
    assert!(again.starts_with("replayed"), "{again}");
    let members = server
        .ledger
        .members_page("acme", "", 100)
        .await
        .expect("members")
        .members;
    assert!(
        members.iter().any(|(m, _)| m == "alice"),
        "still a member: {members:?}"
    );
    // Without a key the re-run is a second removal: refused, the argument named as typed.
    run(&["org", "remove-member", "acme", "alice", "--actor", "olivia"]);
    let said = refused(&["org", "remove-member", "acme", "alice", "--actor", "olivia"]);
    assert!(
        said.contains("InvalidArgument: <MEMBER>: is not a member"),
        "{said}"
    );

    // An admin's org-wide key is listed with its maker, and goes when they leave.
    run(&[
        "org",
        "add-member",
        "acme",
        "carol",
        "--role",
        "admin",
        "--actor",
        "olivia",
    ]);
    let made = run(&[
        "create-key",
        "acme",
        "--org",
        "acme",
        "--actor",
        "carol",
        "--name",
        "ci",
    ]);
    let key_id = made
        .lines()
        .find(|l| l.starts_with("tg_"))
        .and_then(|k| k.split('_').nth(1))
        .unwrap_or_else(|| panic!("no key in {made}"))
        .to_owned();
    let keys = run(&["keys", "acme"]);
    assert!(
        keys.lines().next().is_some_and(|h| h.contains("made by")),
        "{keys}"
    );
    let row: Vec<&str> = keys
        .lines()
        .find(|l| l.starts_with(&key_id))
        .unwrap_or_else(|| panic!("no row for {key_id} in {keys}"))
        .split_whitespace()
        .collect();
    assert_eq!(row[2..], ["-", "-", "carol", "ci"], "{keys}");
    let out = run(&["org", "remove-member", "acme", "carol", "--actor", "olivia"]);
    assert!(
        out.trim_end()
            .ends_with(&format!("; revoked keys: {key_id}")),
        "{out}"
    );

    let said = refused(&[
        "org",
        "budget",
        "acme",
        "100",
        "--utc-offset-minutes",
        "100000",
    ]);
    assert!(
        said.contains("InvalidArgument: --utc-offset-minutes: "),
        "{said}"
    );
}

/// `tollgate prune-functions` deletes the libraries earlier tollgate versions loaded, keeps
/// this version's and anything that is not tollgate's; `--dry-run` only lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_functions_deletes_earlier_versions_only() {
    let redis = common::RedisServer::start();
    let ledger = common::ledger(&redis, tollgate::ledger::Clock::Redis);
    let current = ledger.library().name().to_owned();
    let mut con = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    for (name, function) in [
        ("tollgate_00000000000000aa", "tg_00000000000000aa_debit"),
        ("tollgate_00000000000000bb", "tg_00000000000000bb_debit"),
        ("billing_tollgate_helpers", "helper"),
        ("tollgate_helpers", "helper2"),
    ] {
        let code = format!(
            "#!lua name={name}\nredis.register_function('{function}', function() return 1 end)"
        );
        let _: String = redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg(code)
            .query_async(&mut con)
            .await
            .expect("load a library");
    }
    let run = |dry_run: bool| {
        let mut cmd = common::tollgate();
        cmd.args(["prune-functions", "--redis-url", &redis.url()]);
        if dry_run {
            cmd.arg("--dry-run");
        }
        common::output_within(&mut cmd, common::COMMAND_TIMEOUT)
    };
    // This version's library is not loaded: no process of it runs here, so pruning the
    // others (probably the ones in use) is refused.
    let before = libraries(&mut con).await;
    let refused = run(false);
    assert!(!refused.status.success(), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains(&current),
        "{refused:?}"
    );
    assert_eq!(
        libraries(&mut con).await,
        before,
        "a refused prune deleted something"
    );
    ledger
        .load_scripts()
        .await
        .expect("load this version's library");
    let before = libraries(&mut con).await;
    assert_eq!(before.len(), 5, "{before:?}");

    let listed = run(true);
    let out = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success(), "{listed:?}");
    assert!(
        out.contains("would delete tollgate_00000000000000aa"),
        "{out}"
    );
    assert!(
        out.contains("would delete tollgate_00000000000000bb"),
        "{out}"
    );
    assert!(!out.contains("helpers"), "{out}");
    assert_eq!(
        libraries(&mut con).await,
        before,
        "a dry run deleted something"
    );

    let pruned = run(false);
    let out = String::from_utf8_lossy(&pruned.stdout);
    assert!(pruned.status.success(), "{pruned:?}");
    assert!(out.contains("2 earlier libraries deleted"), "{out}");
    let mut expected = vec![
        "billing_tollgate_helpers".to_owned(),
        "tollgate_helpers".to_owned(),
        current,
    ];
    expected.sort();
    assert_eq!(libraries(&mut con).await, expected);
    // This version's library is whole.
    let (present, all) = ledger.check_scripts(false).await.expect("check");
    assert_eq!(present, all);
}

/// The names of every library in Redis (`FUNCTION LIST`, RESP2: one flat key/value array
/// per library).
async fn libraries(con: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    let list: Vec<Vec<redis::Value>> = redis::cmd("FUNCTION")
        .arg("LIST")
        .query_async(con)
        .await
        .expect("FUNCTION LIST");
    let mut names: Vec<String> = list
        .iter()
        .filter_map(|kv| {
            let at = kv.iter().position(
                |v| matches!(v, redis::Value::BulkString(b) if b.as_slice() == b"library_name"),
            )?;
            match kv.get(at + 1)? {
                redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
                _ => None,
            }
        })
        .collect();
    names.sort();
    names
}

/// The default wallet's (available, refunded, adjusted) of an account, read from the
/// ledger (not from `admin balance`'s printing).
async fn wallet(server: &common::TestServer, account: &str) -> (i64, i64, i64) {
    let wallets = server
        .ledger
        .balance(account, "default")
        .await
        .expect("balance");
    wallets
        .first()
        .map_or((0, 0, 0), |w| (w.available, w.refunded, w.adjusted))
}

/// `tollgate admin …` with the test server's admin token.
fn admin_with_token(server: &common::TestServer, args: &[&str]) -> Output {
    let mut all = vec!["--token", common::ADMIN_TOKEN];
    all.extend_from_slice(args);
    admin(server.grpc_addr.port(), &all)
}

/// `admin` with the admin token, which must succeed: its standard output.
fn admin_ok(server: &common::TestServer, args: &[&str]) -> String {
    let out = admin_with_token(server, args);
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `admin` with the admin token, which must fail: its standard error.
fn admin_refused(server: &common::TestServer, args: &[&str]) -> String {
    let out = admin_with_token(server, args);
    assert!(!out.status.success(), "{args:?}: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

async fn test_server(redis: &common::RedisServer) -> common::TestServer {
    common::TestServer::start(
        common::test_config(&redis.url()),
        tollgate::ledger::Clock::Redis,
    )
    .await
}

/// `admin grant --idempotency-key`: re-running the same command (as after a timeout)
/// replays the first answer, says so, and grants once; without a key, each run grants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_with_an_idempotency_key_grants_once() {
    let redis = common::RedisServer::start();
    let server = test_server(&redis).await;
    let grant = ["grant", "alice", "100", "--idempotency-key", "order-42"];
    let first = admin_with_token(&server, &grant);
    assert!(first.status.success(), "{first:?}");
    let first_text = String::from_utf8_lossy(&first.stdout).into_owned();
    assert!(
        first_text.starts_with("granted 100 to alice (default): lot "),
        "{first_text}"
    );
    assert!(!first_text.contains("replayed"), "{first_text}");
    let again = admin_with_token(&server, &grant);
    assert!(again.status.success(), "{again:?}");
    let again_text = String::from_utf8_lossy(&again.stdout).into_owned();
    assert!(again_text.starts_with("replayed"), "{again_text}");
    // The first answer, verbatim (same lot, same event).
    let lot_and_event = |text: &str| {
        text.split_once("lot ")
            .map(|(_, rest)| rest.trim().to_owned())
            .unwrap_or_else(|| panic!("no lot in {text}"))
    };
    assert_eq!(lot_and_event(&again_text), lot_and_event(&first_text));
    assert_eq!(wallet(&server, "alice").await.0, 100, "granted once");
    // The same key with other arguments is refused, and grants nothing.
    let other = admin_with_token(
        &server,
        &["grant", "alice", "5", "--idempotency-key", "order-42"],
    );
    assert!(!other.status.success(), "{other:?}");
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("idempotency key reused"),
        "{other:?}"
    );
    assert_eq!(wallet(&server, "alice").await.0, 100);

    // Without a key, each run is a new grant.
    for _ in 0..2 {
        let out = admin_with_token(&server, &["grant", "bob", "100"]);
        assert!(out.status.success(), "{out:?}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("replayed"),
            "{out:?}"
        );
    }
    assert_eq!(wallet(&server, "bob").await.0, 200, "granted twice");
}

/// `admin adjust` and `admin refund` move credits as the API does, replay under an
/// idempotency key, and a bad argument is refused naming the argument, changing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adjust_and_refund_commands() {
    let redis = common::RedisServer::start();
    let server = test_server(&redis).await;
    let run = |args: &[&str]| admin_ok(&server, args);
    let refused = |args: &[&str]| admin_refused(&server, args);
    run(&["grant", "alice", "100"]);

    // Down, then up (a lot of kind adjustment), each once under its key.
    let down = run(&["adjust", "alice", "-30", "--idempotency-key", "fix-1"]);
    assert!(
        down.starts_with("adjusted alice (default) by -30"),
        "{down}"
    );
    assert!(down.contains("available 70"), "{down}");
    let replayed = run(&["adjust", "alice", "-30", "--idempotency-key", "fix-1"]);
    assert!(replayed.starts_with("replayed"), "{replayed}");
    assert_eq!(wallet(&server, "alice").await, (70, 0, -30));
    let up = run(&["adjust", "alice", "5", "--description", "goodwill"]);
    assert!(up.contains("by +5: lot "), "{up}");
    assert_eq!(wallet(&server, "alice").await, (75, 0, -25));
    let lots = run(&["lots", "alice"]);
    assert!(
        lots.lines()
            .any(|l| l.contains("adjustment") && l.contains("goodwill")),
        "{lots}"
    );

    // Bad input: named as the command line names it; nothing changed.
    let said = refused(&["adjust", "alice", "0"]);
    assert!(
        said.contains("InvalidArgument: <AMOUNT>: must be non-zero"),
        "{said}"
    );
    let said = refused(&["adjust", "alice", "-500"]);
    assert!(said.contains("insufficient credits"), "{said}");
    let said = refused(&["adjust", "alice", "5", "--priority", "101", "--wallet", "A"]);
    assert!(
        said.contains("--priority: ") && said.contains("--wallet: "),
        "every bad argument, by its flag: {said}"
    );
    // A lot's settings on a negative adjustment (which makes no lot) are refused, not ignored.
    let said = refused(&[
        "adjust",
        "alice",
        "-5",
        "--priority",
        "3",
        "--expires-at",
        "-1",
    ]);
    assert!(
        said.contains("InvalidArgument: --priority, --expires-at: only for a positive adjustment"),
        "{said}"
    );
    assert_eq!(wallet(&server, "alice").await, (75, 0, -25));

    // A charge, refunded in part, once under its key.
    let debit = server
        .ledger
        .debit(&tollgate::ledger::Debit {
            account_id: "alice".into(),
            wallet: "default".into(),
            amount: 20,
            idempotency_key: "call-1".into(),
            operation: "envelope.send".into(),
            metadata: tollgate::ledger::Metadata::new(),
            member_id: String::new(),
            price_inputs: None,
            attempt_mark: None,
        })
        .await
        .expect("debit");
    let charge = debit.event_id.as_str();
    assert_eq!(wallet(&server, "alice").await, (55, 0, -25));
    let refund = ["refund", charge, "15", "--idempotency-key", "rma-7"];
    let refunded = run(&refund);
    assert!(
        refunded.starts_with(&format!("refunded 15 of charge {charge}")),
        "{refunded}"
    );
    assert!(
        refunded.contains("15 of the charge refunded so far"),
        "{refunded}"
    );
    let replayed = run(&refund);
    assert!(replayed.starts_with("replayed"), "{replayed}");
    assert_eq!(wallet(&server, "alice").await, (70, 15, -25));

    // Bad input: named, nothing refunded.
    let said = refused(&["refund", charge, "0"]);
    assert!(said.contains("InvalidArgument: <AMOUNT>: "), "{said}");
    let said = refused(&["refund", "not-a-charge", "5"]);
    assert!(said.contains("InvalidArgument: <CHARGE_ID>: "), "{said}");
    let said = refused(&["refund", charge, "5", "--idempotency-key", "has space"]);
    assert!(said.contains("--idempotency-key: "), "{said}");
    let said = refused(&["refund", charge, "6"]);
    assert!(said.contains("5 refundable"), "{said}");
    // A negative number is taken as the amount (refused by the server, by name), not as
    // an unknown flag.
    let said = refused(&["refund", charge, "-5"]);
    assert!(said.contains("InvalidArgument: <AMOUNT>: "), "{said}");
    let said = refused(&["grant", "alice", "-5"]);
    assert!(said.contains("InvalidArgument: <AMOUNT>: "), "{said}");
    let said = refused(&["grant", "alice", "5", "--priority", "-1"]);
    assert!(said.contains("InvalidArgument: --priority: "), "{said}");
    assert_eq!(wallet(&server, "alice").await, (70, 15, -25));
}

/// A bad `--expires-at` (in the past, or out of range) is refused naming `--expires-at`,
/// not the request's `expires_at_ms`, and grants nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_expires_at_is_named_as_the_flag() {
    let redis = common::RedisServer::start();
    let server = test_server(&redis).await;
    for (command, expires_at) in [
        ("grant", "--expires-at=1000"),
        ("grant", "--expires-at=-5"),
        ("grant", "--expires-at=99999999999999"),
        ("adjust", "--expires-at=1000"),
    ] {
        let out = admin_with_token(&server, &[command, "alice", "10", expires_at]);
        assert!(!out.status.success(), "{expires_at}: {out:?}");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains("InvalidArgument: --expires-at: "),
            "{command} {expires_at}: {said}"
        );
        assert!(
            !said.contains("expires_at_ms"),
            "{command} {expires_at}: {said}"
        );
    }
    // A negative value also parses as a separate argument.
    let out = admin_with_token(&server, &["grant", "alice", "10", "--expires-at", "-5"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--expires-at: "),
        "{out:?}"
    );
    assert_eq!(wallet(&server, "alice").await, (0, 0, 0), "nothing granted");
}

/// `--expires-at` takes a UTC time as well as ms (a credit record's expiry is a date, not
/// a number of ms an operator computes), `lots` shows expiries so, and a time that is not
/// one is refused by the command, naming the flag, granting nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expires_at_takes_a_utc_time_and_lots_show_one() {
    let redis = common::RedisServer::start();
    let server = test_server(&redis).await;
    admin_ok(
        &server,
        &[
            "grant",
            "alice",
            "10",
            "--expires-at",
            "2099-12-31T23:59:59Z",
        ],
    );
    admin_ok(
        &server,
        &["adjust", "alice", "5", "--expires-at=4102444799000"],
    );
    let lots = server
        .ledger
        .lots("alice", "default", 0, 10)
        .await
        .expect("lots");
    let expiries: Vec<i64> = lots.lots.iter().map(|l| l.expires_at_ms).collect();
    assert_eq!(expiries, [4_102_444_799_000, 4_102_444_799_000]);
    let listed = admin_ok(&server, &["lots", "alice"]);
    assert_eq!(
        listed.matches("2099-12-31T23:59:59Z").count(),
        2,
        "{listed}"
    );
    let out = admin_with_token(
        &server,
        &[
            "grant",
            "alice",
            "10",
            "--expires-at",
            "2099-02-30T00:00:00Z",
        ],
    );
    assert!(!out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("--expires-at"), "{said}");
    assert!(said.contains("UTC time"), "{said}");
    assert_eq!(
        wallet(&server, "alice").await,
        (15, 0, 5),
        "nothing more granted"
    );
}

/// `serve --help` (and `settle --help`) show the listen addresses used when neither the
/// flag, the config file nor the environment gives one.
#[test]
fn serve_help_shows_the_default_listen_addresses() {
    let help = |command: &str| {
        let out = common::output_within(
            common::tollgate().args([command, "--help"]),
            common::COMMAND_TIMEOUT,
        );
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let serve = help("serve");
    for default in [
        tollgate::config::DEFAULT_GRPC_ADDR,
        tollgate::config::DEFAULT_HTTP_ADDR,
    ] {
        assert!(serve.contains(&format!("[default: {default}]")), "{serve}");
    }
    assert!(serve.contains("TOLLGATE_SERVER__GRPC_ADDR"), "{serve}");
    let settle = help("settle");
    assert!(
        settle.contains(&format!(
            "[default: {}]",
            tollgate::config::DEFAULT_HTTP_ADDR
        )),
        "{settle}"
    );
}

/// `admin org budget` names whose budget it set or removed (a member's, in which org, or
/// the account's own), a window's length and a calendar's UTC offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_budget_says_whose_budget_and_its_period() {
    let redis = common::RedisServer::start();
    let server = test_server(&redis).await;
    let run = |args: &[&str]| admin_ok(&server, args);
    run(&["org", "create", "globex", "olivia"]);
    run(&["org", "add-member", "globex", "alice", "--actor", "olivia"]);

    let said = run(&["org", "budget", "globex", "30", "--member", "alice"]);
    assert!(
        said.starts_with("member budget of alice in globex (default): 30 per day, "),
        "{said}"
    );
    let said = run(&[
        "org",
        "budget",
        "globex",
        "50",
        "--period",
        "window",
        "--window-secs",
        "3600",
    ]);
    assert!(
        said.starts_with("account budget of globex (default): 50 per 3600 s window, "),
        "{said}"
    );
    let said = run(&[
        "org",
        "budget",
        "globex",
        "70",
        "--period",
        "month",
        "--utc-offset-minutes",
        "60",
    ]);
    assert!(said.contains(": 70 per month (UTC+01:00), "), "{said}");
    let said = run(&[
        "org",
        "budget",
        "globex",
        "30",
        "--member",
        "alice",
        "--utc-offset-minutes",
        "-330",
    ]);
    assert!(said.contains(": 30 per day (UTC-05:30), "), "{said}");

    // The balance shows when each budget resets, as a UTC time: the account's month
    // at midnight UTC+01:00, the member's day at midnight UTC-05:30.
    let said = run(&["balance", "globex", "--member", "alice"]);
    let resets = |scope: &str| {
        said.lines()
            .find(|l| l.starts_with("budget default (") && l.contains(scope))
            .and_then(|l| l.split_once("resets at "))
            .map(|(_, at)| at.to_owned())
            .unwrap_or_else(|| panic!("no {scope} budget in {said}"))
    };
    assert!(resets("account").ends_with("T23:00:00Z"), "{said}");
    assert!(resets("member").ends_with("T05:30:00Z"), "{said}");

    let said = run(&["org", "budget", "globex", "0", "--member", "alice"]);
    assert!(
        said.starts_with("member budget of alice in globex (default) removed (event "),
        "{said}"
    );
    let said = run(&["org", "budget", "globex", "0"]);
    assert!(
        said.starts_with("account budget of globex (default) removed (event "),
        "{said}"
    );
    let said = admin_refused(&server, &["org", "budget", "globex", "-5"]);
    assert!(said.contains("InvalidArgument: <LIMIT>: "), "{said}");
    // Removed already: refused, naming the budget looked for.
    let said = admin_refused(
        &server,
        &["org", "budget", "globex", "0", "--member", "alice"],
    );
    assert!(
        said.contains("NotFound: there is no member budget of alice in globex (default) to remove"),
        "{said}"
    );
    let said = admin_refused(
        &server,
        &["org", "budget", "globex", "0", "--wallet", "esign"],
    );
    assert!(
        said.contains("NotFound: there is no account budget of globex (esign) to remove"),
        "{said}"
    );
}

/// `admin balance`, `create-key`, `lots`, `keys` and `revoke-key` name a bad argument as
/// typed (`--member`, `--wallet`, `<ACCOUNT>`, `--org`, `<KEY_ID>`), not as the request's
/// field (`member_id`, …); `lots` prints its table's header only over a first page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balance_and_create_key_name_bad_arguments_as_typed() {
    let redis = common::RedisServer::start();
    let server = test_server(&redis).await;
    let refused = |args: &[&str]| admin_refused(&server, args);
    for (args, named, field) in [
        (&["balance", "bad/x"][..], "<ACCOUNT>", "account_id"),
        (
            &["balance", "alice", "--wallet", "BAD/W"],
            "--wallet",
            "wallet",
        ),
        (
            &["balance", "alice", "--member", "bad/x"],
            "--member",
            "member_id",
        ),
        (&["create-key", "bad/x"], "<ACCOUNT>", "account_id"),
        (
            &["create-key", "acme", "--org", "bad/x", "--actor", "olivia"],
            "--org",
            "org_id",
        ),
        (
            &["create-key", "acme", "--org", "acme", "--actor", "bad/x"],
            "--actor",
            "actor_id",
        ),
        (&["lots", "a b"], "<ACCOUNT>", "account_id"),
        (
            &["lots", "alice", "--wallet", "BAD/W"],
            "--wallet",
            "wallet",
        ),
        (&["keys", "a b"], "<ACCOUNT>", "account_id"),
        (&["revoke-key", "nope"], "<KEY_ID>", "key_id"),
    ] {
        let said = refused(args);
        assert!(
            said.contains(&format!("InvalidArgument: {named}: ")),
            "{args:?}: {said}"
        );
        assert!(!said.contains(&format!(" {field}:")), "{args:?}: {said}");
    }
    let out = admin_with_token(&server, &["lots", "alice", "--wallet", "BAD/W"]);
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "",
        "no header over a refusal"
    );
}

/// `--server HOST:PORT` without a scheme (as `serve` prints its gRPC address) is
/// http://HOST:PORT, and `admin --help` says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_server_without_a_scheme_is_http() {
    let redis = common::RedisServer::start();
    let server = test_server(&redis).await;
    let out = common::output_within(
        common::tollgate()
            .args(["admin", "--server"])
            .arg(format!("127.0.0.1:{}", server.grpc_addr.port()))
            .args(["--token", common::ADMIN_TOKEN, "balance", "alice"]),
        common::COMMAND_TIMEOUT,
    );
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("account alice"),
        "{out:?}"
    );
    let help = common::output_within(
        common::tollgate().args(["admin", "--help"]),
        common::COMMAND_TIMEOUT,
    );
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("a bare HOST:PORT"), "{help}");
}

/// Two request fields the command line names alike are refused alike: the refusal says it
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_names_each_argument_once() {
    let redis = common::RedisServer::start();
    let server = test_server(&redis).await;
    let out = admin_with_token(
        &server,
        &["org", "add-member", "globex", "bad/x", "--actor", "olivia"],
    );
    assert!(!out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(said.matches("<MEMBER>: ").count(), 1, "{said}");
}

/// `--idempotency-key ''` is a mistake, refused by the command itself before it calls the
/// server (no server listens here), for every command that takes the option.
#[test]
fn an_empty_idempotency_key_is_refused_by_the_command() {
    let port = common::free_port();
    for command in [
        &["grant", "alice", "10"][..],
        &["adjust", "alice", "10"],
        &["refund", "0-1-1", "10"],
        &["create-key", "alice"],
        &["org", "create", "acme", "olivia"],
        &["org", "add-member", "acme", "alice", "--actor", "olivia"],
        &["org", "remove-member", "acme", "alice", "--actor", "olivia"],
        &[
            "org", "allocate", "acme", "alice", "10", "--actor", "olivia",
        ],
        &["org", "budget", "acme", "10"],
    ] {
        let mut args = command.to_vec();
        args.extend(["--idempotency-key", ""]);
        let out = admin(port, &args);
        assert!(!out.status.success(), "{args:?}: {out:?}");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("must not be empty"), "{args:?}: {said}");
        assert!(!said.contains("is required"), "{args:?}: {said}");
    }
}
