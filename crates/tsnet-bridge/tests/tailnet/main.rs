//! Integration tests of the tailnet bridge: real tsnet nodes on the embedded
//! local tailnet, all in this process. Run them in a loopback-only network
//! namespace (`scripts/test` does): nothing here may reach beyond 127.0.0.1.
//!
//! Set `TAILKITD_TEST_LOG=tsnet=debug` to see the Go side's logs.

#![cfg(feature = "localnet")]

mod connections;
mod node;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tsnet_bridge::{
    BridgeError, Localnet, LocalnetOptions, MAGIC_DNS_SUFFIX, Node, NodeConfig, Stream,
    ensure_signal_onstack,
};

/// How long a node may take to come up.
const UP: Duration = Duration::from_secs(60);
/// The hang guard around each whole test.
const TEST_LIMIT: Duration = Duration::from_secs(300);

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TAILKITD_TEST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A local tailnet plus a temp dir for node state.
struct Net {
    localnet: Localnet,
    dir: tempfile::TempDir,
}

impl Net {
    async fn start() -> Net {
        Net::start_with(LocalnetOptions::default()).await
    }

    async fn start_with(opts: LocalnetOptions) -> Net {
        init_tracing();
        Net {
            localnet: Localnet::start_with(opts)
                .await
                .expect("start local tailnet"),
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn config(&self, name: &str) -> NodeConfig {
        self.localnet.node_config(name, &self.state_dir(name))
    }

    fn state_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    async fn node(&self, name: &str) -> Node {
        let node = Node::new(self.config(name)).expect("create node");
        node.up(UP)
            .await
            .unwrap_or_else(|e| panic!("{name} up: {e}"));
        node
    }
}

/// Taken by the tests that load the machine hardest (hundreds of
/// connections at once), so that they run one at a time and do not starve
/// each other's hang guards on a busy machine.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs a test body under the hang guard. A body stuck in a blocking call
/// never yields to the timer, and a body that panicked leaves the runtime
/// waiting, as it shuts down, for the bridge calls still under way (a
/// tsnet close that never returns held a loaded machine for 20 minutes):
/// a watchdog thread ends the whole test process then, 30 s past the limit
/// or 60 s after the panic, so that a hang is a failure, not a stall.
async fn guarded<F: Future<Output = ()>>(body: F) {
    use std::sync::mpsc::RecvTimeoutError;
    // The harness prints a test's panic only once the test ends, which a
    // hung one never does: print it at once, past the harness's capture.
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let harness = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "tailnet test panic: {info}");
            harness(info);
        }));
    });
    let (done, finished) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let why = match finished.recv_timeout(TEST_LIMIT + Duration::from_secs(30)) {
            Ok(()) => return,
            Err(RecvTimeoutError::Timeout) => "hung past its guard, stuck outside the runtime",
            Err(RecvTimeoutError::Disconnected) => {
                std::thread::sleep(Duration::from_secs(60));
                "panicked, and its runtime still waits for a bridge call 60 s later"
            }
        };
        // Not eprintln!: the test harness captures that, and this process
        // ends before the harness prints anything.
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "a tailnet test {why}: exiting");
        std::process::exit(101);
    });
    tokio::time::timeout(TEST_LIMIT, body)
        .await
        .expect("test did not finish within its hang guard");
    let _ = done.send(());
}

fn ipv4(node: &Node) -> IpAddr {
    node.ips()
        .unwrap()
        .into_iter()
        .find(IpAddr::is_ipv4)
        .expect("node has an IPv4 tailnet address")
}

async fn read_all(stream: &mut Stream) -> Vec<u8> {
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.unwrap();
    buf
}
