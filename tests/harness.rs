//! The test harness itself (tests/common/): what it accepts as a started child.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};

/// A process of the test's own (a thread here) listening on a port and answering a Redis
/// `PING` as a redis-server would: another process that took a port picked free.
fn pong_listener() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut ping = [0u8; 6];
            if stream.read_exact(&mut ping).is_ok() {
                let _ = stream.write_all(b"+PONG\r\n");
            }
        }
    });
    port
}

/// The `sleep` children of this process still there (running, or ended and not reaped).
fn sleep_children() -> Vec<u32> {
    let ours = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // `pid (comm) state ppid …`
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                let fields: Vec<&str> = stat.split_whitespace().collect();
                fields.get(1) == Some(&"(sleep)") && fields.get(3) == Some(&ours.as_str())
            })
        })
        .collect()
}

/// The race spawn_listening used to lose: a port picked free is taken by another process
/// that answers the readiness probe, while the child given that port has not yet found
/// out it cannot bind it (frozen here: `sleep` stands in for it, and never binds). The
/// probe's answer is not the child's, so that child is given up (and killed), and the
/// next one, on other ports, is accepted once it listens there itself and answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_answered_by_another_process_is_not_the_child_listening() {
    let taken = pong_listener();
    let mut starts = 0;
    let listening = common::spawn_listening_picking(
        || {
            starts += 1;
            if starts == 1 {
                vec![taken]
            } else {
                vec![common::free_port()]
            }
        },
        common::START_TIMEOUT,
        |ports| {
            if ports[0] == taken {
                let mut cmd = Command::new("sleep");
                cmd.arg("600");
                cmd
            } else {
                let mut cmd = Command::new("redis-server");
                cmd.args(["--port", &ports[0].to_string(), "--bind", "127.0.0.1"])
                    .args(["--save", "", "--appendonly", "no"])
                    .stdout(Stdio::null());
                cmd
            }
        },
        // Blocking, briefly: the dummy answers from a thread of its own.
        |ports| async move { common::redis_ping(ports[0]) },
    )
    .await;
    assert_ne!(
        listening.ports,
        vec![taken],
        "accepted the port another process answers on"
    );
    assert_eq!(
        common::redis_pid(listening.ports[0]),
        Some(listening.child.0.id()),
        "the child answering is not the one started"
    );
    assert!(common::listens_on(listening.child.0.id(), &listening.ports));
    assert_eq!(
        sleep_children(),
        Vec::<u32>::new(),
        "the child given up still runs"
    );
}

/// What /proc says of a listener: this process's own socket, and, seen from a child that
/// has none, another process's.
#[test]
fn listeners_tells_own_sockets_from_other_processes() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let ours = common::listeners(std::process::id()).expect("our /proc");
    assert!(ours.own.contains(&port), "{ours:?}");
    assert!(!ours.others.contains(&port), "{ours:?}");
    assert!(common::listens_on(std::process::id(), &[port]));

    // `cat` waiting on its input (not `sleep`: the test above counts those).
    let child = common::KillOnDrop(
        Command::new("cat")
            .stdin(Stdio::piped())
            .spawn()
            .expect("cat"),
    );
    let theirs = common::listeners(child.0.id()).expect("the child's /proc");
    assert!(theirs.others.contains(&port), "{theirs:?}");
    assert!(!theirs.own.contains(&port), "{theirs:?}");
    assert!(!common::listens_on(child.0.id(), &[port]));
}
