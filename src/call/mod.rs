//! `tailkitd call` and `tailkitd tools`: the operator's client (SPEC §8).
//! Runs a command on one node with its output live on the local stdout
//! and stderr and its exit code as the client's, or on a fleet in
//! parallel with each line prefixed by the node's name and a summary.
//!
//! - [`cli`]: the command lines, checked into a [`cli::Plan`].
//! - [`reach`]: onto the tailnet: an ephemeral node of its own (auth key),
//!   else the machine's tailscaled.
//! - [`target`]: TARGETs, `--prefix`, `--all`, `--tag` resolved in the
//!   peer list.
//! - [`job`]: one node's call: the live stream, its resumption, the
//!   fallback to polling, cancellation.
//! - [`fleet`]: every node, bounded parallelism, the summary.
//! - [`report`]: how a node's call ended and the exit status for it.
//! - [`output`]: the one printer thread and the progress line.
//! - [`stop`]: Ctrl-C and friends.
//! - [`tools`]: the table of `tailkitd tools`.

pub mod cli;
pub mod fleet;
pub mod job;
pub mod output;
pub mod reach;
pub mod report;
pub mod stop;
pub mod target;
pub mod tools;

use std::sync::Arc;
use std::time::Duration;

use cli::{CallArgs, TailnetArgs, ToolsArgs};
use reach::Tailnet;
use report::EXIT_NEVER_RAN;
use stop::Stop;

use crate::client::{self, Call};

/// How long `GET /tools` may take.
const TOOLS_ANSWER: Duration = Duration::from_secs(30);

/// `tailkitd call`: the exit status.
pub async fn run_call(args: CallArgs, os_hostname: &str) -> u8 {
    let plan = match cli::plan(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("tailkitd call: {e}");
            return EXIT_NEVER_RAN;
        }
    };
    let (tailnet, stop) = match open(&args.tailnet, "call", os_hostname).await {
        Ok(opened) => opened,
        Err(exit) => return exit,
    };
    let tailnet = Arc::new(tailnet);
    let exit = fleet::run(&plan, tailnet.clone(), args.tailnet.port, stop.clone()).await;
    close(tailnet).await;
    exit
}

/// `tailkitd tools`: the exit status.
pub async fn run_tools(args: ToolsArgs, os_hostname: &str) -> u8 {
    let (tailnet, stop) = match open(&args.tailnet, "tools", os_hostname).await {
        Ok(opened) => opened,
        Err(exit) => return exit,
    };
    let exit = tokio::select! {
        exit = list_tools(&tailnet, &args) => exit,
        exit = stop.stopped() => exit,
    };
    tailnet.close().await;
    exit
}

async fn list_tools(tailnet: &Tailnet, args: &ToolsArgs) -> u8 {
    let fail = |e: String| {
        for line in e.lines() {
            eprintln!(
                "tailkitd tools: {}: {}",
                args.target,
                report::printable(line)
            );
        }
        EXIT_NEVER_RAN
    };
    let target = match fleet::resolve_one(tailnet, &args.target, args.tailnet.port).await {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let conn = match tailnet.dial(target.addr, TOOLS_ANSWER).await {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot reach {}: {e}", target.addr)),
    };
    let resp = match client::send(conn, Call::get(&target.host, "/tools"), TOOLS_ANSWER).await {
        Ok(r) => r,
        Err(e) => return fail(e.to_string()),
    };
    if resp.status != hyper::StatusCode::OK {
        let error = resp.json["error"].as_str().unwrap_or(resp.text.trim());
        let mut msg = format!("{}: {error}", resp.status);
        if let Some(hint) = resp.json["hint"].as_str() {
            msg.push_str(&format!("\nhint: {hint}"));
        }
        return fail(msg);
    }
    if args.json {
        println!("{}", resp.text.trim_end());
        return 0;
    }
    match serde_json::from_value::<Vec<tools::ToolInfo>>(resp.json) {
        Ok(list)
            if list
                .iter()
                .all(|t| t.commands.as_ref().is_none_or(Vec::is_empty)) =>
        {
            eprintln!("tailkitd tools: {}: no command you may run", target.name);
            0
        }
        Ok(list) => {
            print!("{}", tools::table(&list));
            0
        }
        Err(e) => fail(format!("not a list of tools: {e}")),
    }
}

/// Watches signals and joins the tailnet; else, after saying why not, the
/// exit status (a stop while joining ends the command).
async fn open(args: &TailnetArgs, cmd: &str, os_hostname: &str) -> Result<(Tailnet, Stop), u8> {
    let stop = Stop::new();
    if let Err(e) = stop::watch_signals(stop.clone()) {
        eprintln!("tailkitd {cmd}: installing signal handlers: {e}");
        return Err(EXIT_NEVER_RAN);
    }
    let opened = tokio::select! {
        t = Tailnet::open(args, |k| std::env::var(k).ok(), os_hostname) => t,
        exit = stop.stopped() => return Err(exit),
    };
    match opened {
        Ok(t) => {
            tracing::debug!(via = %t.describe(), "on the tailnet");
            Ok((t, stop))
        }
        Err(e) => {
            eprintln!("tailkitd {cmd}: {e}");
            Err(EXIT_NEVER_RAN)
        }
    }
}

async fn close(tailnet: Arc<Tailnet>) {
    match Arc::try_unwrap(tailnet) {
        Ok(t) => t.close().await,
        // Cannot happen once every node's task ended; the node then closes
        // when the last handle goes.
        Err(_) => tracing::warn!("the tailnet is still in use at exit"),
    }
}
