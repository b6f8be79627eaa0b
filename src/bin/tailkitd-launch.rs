//! `tailkitd-launch`: the small supervisor the daemon starts for each job
//! (see `tailkitd::exec::launcher`). A separate executable because the
//! `tailkitd` binary carries the Go runtime, which starts its own threads
//! in every process that loads it; a per-job supervisor must stay small and
//! single-threaded. It compiles the launcher module on its own, without the
//! library, so that nothing links the Go archive in.
#![deny(unsafe_code)]

// The daemon's half of the status protocol is unused here.
#[allow(dead_code)]
#[path = "../exec/launcher.rs"]
mod launcher;

fn main() {
    std::process::exit(launcher::main_from_args());
}
