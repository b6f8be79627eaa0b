//! The supervisor binary against its protocol: started as the daemon starts
//! it (this test process standing in for the daemon), with a Unix socket
//! pair as its stdin.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tailkitd_launch::{Order, Status};

/// Starts the launcher for `program` with `argv`; returns it and our end of
/// its status socket.
fn launch(program: &str, argv: &[&str]) -> (Child, BufReader<UnixStream>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_tailkitd-launch"))
        .arg(std::process::id().to_string())
        .arg(program)
        .args(argv)
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (child, BufReader::new(ours))
}

fn next_status(socket: &mut BufReader<UnixStream>) -> Status {
    let mut line = String::new();
    socket.read_line(&mut line).unwrap();
    Status::parse(line.trim_end()).unwrap_or_else(|| panic!("not a status line: {line:?}"))
}

#[test]
fn it_reports_the_start_and_the_exit_code() {
    let (mut child, mut socket) = launch("/bin/sh", &["sh", "-c", "exit 3"]);
    let Status::Started(pid) = next_status(&mut socket) else {
        panic!("no started line")
    };
    assert!(pid > 1);
    assert_eq!(next_status(&mut socket), Status::Exited(3));
    assert!(child.wait().unwrap().success());
}

#[test]
fn term_reaches_the_program_and_its_death_is_reported() {
    let (mut child, mut socket) = launch("/bin/sleep", &["sleep", "300"]);
    assert!(matches!(next_status(&mut socket), Status::Started(_)));
    socket.get_mut().write_all(Order::Term.line()).unwrap();
    assert_eq!(next_status(&mut socket), Status::Signaled(libc_sigterm()));
    // With the program dead and nothing left, the launcher may already
    // have ended the job and closed its end: then `kill` meets a broken
    // pipe, which is as good.
    match socket.get_mut().write_all(Order::Kill.line()) {
        Ok(()) => {}
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}"),
    }
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_program_that_cannot_be_executed_is_a_spawn_error() {
    let (mut child, mut socket) = launch("/nonexistent/program", &["program"]);
    match next_status(&mut socket) {
        Status::SpawnError { errno, .. } => assert_eq!(errno, 2, "ENOENT"),
        other => panic!("{other:?}"),
    }
    assert_eq!(child.wait().unwrap().code(), Some(125));
}

#[test]
fn a_bad_invocation_is_an_error_line() {
    let (mut child, mut socket) = launch("/bin/true", &[]);
    match next_status(&mut socket) {
        Status::Error(message) => assert!(message.contains("usage"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(child.wait().unwrap().code(), Some(125));
}

/// SIGTERM's number (15 on every Linux architecture this builds for).
fn libc_sigterm() -> i32 {
    nix::sys::signal::Signal::SIGTERM as i32
}
