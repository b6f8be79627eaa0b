//! Reload latency through the real watcher: a tool file written → its
//! command visible in the registry (what a call would find), for each way
//! of writing one: a new file renamed into place, a rename-save over an
//! existing file, a Kubernetes ConfigMap `..data` swap, and a file written
//! in place (served once it settled, so about the settle period). Prints
//! p50/p99/max over 200 trials each (trials spaced apart, as edits are),
//! the rebuilds each write and each burst cost, and the cost of a full
//! `reload()`, with 50 and with 500 other tools in the directory. The clock
//! starts when the write that makes the new version visible starts (the
//! rename, the `..data` swap; for an in-place write, when it is done); the
//! time the writer's rename(2) itself took is printed too.
//!
//! `scripts/bench reload`; `cargo bench --bench reload -- TRIALS TOOLS...`
//! for other counts.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tailkitd::tools::{DEFAULT_SETTLE, Registry, ToolLimits};

/// The pause between two trials: longer than the watcher's coalescing
/// period, so that each write is a first one, as an edit by hand is.
const BETWEEN: Duration = Duration::from_millis(60);
/// How many in-place writes run at once (each on its own file).
const IN_PLACE_BATCH: usize = 25;

fn tool(name: &str, marker: &str) -> String {
    let commands: Vec<String> = (0..5)
        .map(|i| format!(r#"{{"name": "cmd{i}", "exec_parts": ["/bin/echo", "{marker}"], "acl_cap": "example.com/cap/x"}}"#))
        .collect();
    format!(
        r#"{{"name": "{name}", "commands": [{}]}}"#,
        commands.join(",")
    )
}

fn marker_of(registry: &Registry, name: &str) -> Option<String> {
    Some(registry.lookup(name, "cmd0")?.command.exec_parts[1].clone())
}

/// Polls until `name` carries `marker`; the time since `start`.
fn wait_visible(registry: &Registry, name: &str, marker: &str, start: Instant) -> Duration {
    loop {
        if marker_of(registry, name).as_deref() == Some(marker) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{name} never showed {marker}"
        );
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Writes `text` to a temporary file and renames it to `name`; returns
/// when the rename started, and how long it took (ext4 flushes a file
/// renamed over another one, which takes a while on a busy disk).
fn rename_into(dir: &Path, name: &str, text: &str) -> (Instant, Duration) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write the temp file");
    let start = Instant::now();
    std::fs::rename(&tmp, dir.join(name)).expect("rename");
    (start, start.elapsed())
}

#[derive(Default)]
struct Figures {
    latencies: Vec<Duration>,
    rebuilds: u64,
    /// How long the writer's rename took, where it is worth telling.
    renames: Vec<Duration>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// p50, p99 and max of `values` (sorted here).
fn quantiles(values: &mut [Duration]) -> [Duration; 3] {
    values.sort();
    let n = values.len();
    let at = |q: f64| values[((n as f64 * q).ceil() as usize).clamp(1, n) - 1];
    [at(0.5), at(0.99), at(1.0)]
}

impl Figures {
    fn print(mut self, what: &str) {
        let n = self.latencies.len();
        let [p50, p99, max] = quantiles(&mut self.latencies);
        println!(
            "  {what:<44} p50 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms  {} rebuilds for {n} writes",
            ms(p50),
            ms(p99),
            ms(max),
            self.rebuilds
        );
        if !self.renames.is_empty() {
            let [p50, p99, max] = quantiles(&mut self.renames);
            println!(
                "  {:<44} p50 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms",
                "  of which the writer's rename(2) itself",
                ms(p50),
                ms(p99),
                ms(max)
            );
        }
    }
}

/// A plain tools directory with `others` tools and a watching registry.
fn plain_dir(others: usize) -> (tempfile::TempDir, Arc<Registry>) {
    let dir = tempfile::tempdir().expect("temp dir");
    for t in 0..others {
        std::fs::write(
            dir.path().join(format!("tool{t}.json")),
            tool(&format!("tool{t}"), "x"),
        )
        .expect("write a tool");
    }
    let registry = Arc::new(Registry::load(dir.path(), ToolLimits::default()));
    assert_eq!(registry.counts().0, others);
    (dir, registry)
}

fn new_files(trials: usize, others: usize) -> Figures {
    let (dir, registry) = plain_dir(others);
    let _watch = registry.spawn_watcher().expect("watcher");
    std::thread::sleep(Duration::from_millis(300));
    let before = registry.rebuilds();
    let mut figures = Figures::default();
    for k in 0..trials {
        let name = format!("new{k}");
        let (start, took) = rename_into(dir.path(), &format!("{name}.json"), &tool(&name, "1"));
        figures
            .latencies
            .push(wait_visible(&registry, &name, "1", start));
        figures.renames.push(took);
        std::thread::sleep(BETWEEN);
    }
    figures.rebuilds = registry.rebuilds() - before;
    figures
}

fn rename_saves(trials: usize, others: usize) -> Figures {
    let (dir, registry) = plain_dir(others);
    std::fs::write(dir.path().join("live.json"), tool("live", "0")).expect("write");
    registry.reload();
    let _watch = registry.spawn_watcher().expect("watcher");
    std::thread::sleep(Duration::from_millis(300));
    let before = registry.rebuilds();
    let mut figures = Figures::default();
    for k in 1..=trials {
        let marker = k.to_string();
        let (start, took) = rename_into(dir.path(), "live.json", &tool("live", &marker));
        figures
            .latencies
            .push(wait_visible(&registry, "live", &marker, start));
        figures.renames.push(took);
        std::thread::sleep(BETWEEN);
    }
    figures.rebuilds = registry.rebuilds() - before;
    figures
}

/// Writes generation `k` of a ConfigMap with `others` keys plus `live`
/// the way the kubelet's atomic writer does, and returns when `..data` was
/// swapped. `..data` and the per-key symlinks exist after the first. The
/// kubelet then removes the previous generation: [`remove_generation`].
fn configmap_generation(dir: &Path, k: usize, others: usize) -> Instant {
    let generation = dir.join(format!("..gen_{k}"));
    std::fs::create_dir(&generation).expect("mkdir");
    for t in 0..others {
        std::fs::write(
            generation.join(format!("tool{t}.json")),
            tool(&format!("tool{t}"), "x"),
        )
        .expect("write a key");
    }
    std::fs::write(generation.join("live.json"), tool("live", &k.to_string())).expect("write");
    symlink(format!("..gen_{k}"), dir.join("..data_tmp")).expect("symlink");
    let start = Instant::now();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("swap ..data");
    start
}

/// Removes generation `k` of a ConfigMap.
fn remove_generation(dir: &Path, k: usize) {
    std::fs::remove_dir_all(dir.join(format!("..gen_{k}"))).expect("remove a generation");
}

fn configmap_swaps(trials: usize, others: usize) -> Figures {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    configmap_generation(d, 0, others);
    for t in 0..others {
        let key = format!("tool{t}.json");
        symlink(format!("..data/{key}"), d.join(&key)).expect("symlink a key");
    }
    symlink("..data/live.json", d.join("live.json")).expect("symlink a key");
    let registry = Arc::new(Registry::load(d, ToolLimits::default()));
    assert_eq!(registry.counts().0, others + 1);
    let _watch = registry.spawn_watcher().expect("watcher");
    std::thread::sleep(Duration::from_millis(300));
    let before = registry.rebuilds();
    let mut figures = Figures::default();
    for k in 1..=trials {
        let start = configmap_generation(d, k, others);
        figures
            .latencies
            .push(wait_visible(&registry, "live", &k.to_string(), start));
        // Where the kubelet removes it, just after the swap, it competes
        // for the disk with the daemon's reads; counted apart here.
        remove_generation(d, k - 1);
        std::thread::sleep(BETWEEN);
    }
    figures.rebuilds = registry.rebuilds() - before;
    figures
}

fn in_place_writes(trials: usize, others: usize) -> Figures {
    let (dir, registry) = plain_dir(others);
    for i in 0..IN_PLACE_BATCH {
        std::fs::write(
            dir.path().join(format!("edit{i}.json")),
            tool(&format!("edit{i}"), "0"),
        )
        .expect("write");
    }
    registry.reload();
    let _watch = registry.spawn_watcher().expect("watcher");
    std::thread::sleep(Duration::from_millis(1500));
    let before = registry.rebuilds();
    let mut latencies = Vec::with_capacity(trials);
    let mut round = 0usize;
    while latencies.len() < trials {
        round += 1;
        let marker = round.to_string();
        let batch = IN_PLACE_BATCH.min(trials - latencies.len());
        let starts: Vec<(String, Instant)> = (0..batch)
            .map(|i| {
                let name = format!("edit{i}");
                std::fs::write(
                    dir.path().join(format!("{name}.json")),
                    tool(&name, &marker),
                )
                .expect("write in place");
                (name, Instant::now())
            })
            .collect();
        let mut left: Vec<(String, Instant)> = starts;
        while !left.is_empty() {
            left.retain(|(name, start)| {
                if marker_of(&registry, name).as_deref() == Some(marker.as_str()) {
                    latencies.push(start.elapsed());
                    false
                } else {
                    assert!(start.elapsed() < Duration::from_secs(60));
                    true
                }
            });
            std::thread::sleep(Duration::from_micros(200));
        }
        std::thread::sleep(BETWEEN);
    }
    Figures {
        latencies,
        rebuilds: registry.rebuilds() - before,
        renames: Vec::new(),
    }
}

/// Rebuilds for one burst of 20 writes of each kind, once all is quiet.
fn bursts(others: usize) {
    let (dir, registry) = plain_dir(others);
    let _watch = registry.spawn_watcher().expect("watcher");
    let quiet = || std::thread::sleep(DEFAULT_SETTLE + Duration::from_millis(500));
    quiet();
    let before = registry.rebuilds();
    for i in 0..20 {
        rename_into(dir.path(), "b.json", &tool("b", &i.to_string()));
    }
    wait_visible(&registry, "b", "19", Instant::now());
    quiet();
    let renames = registry.rebuilds() - before;
    let before = registry.rebuilds();
    for i in 0..20 {
        std::fs::write(dir.path().join("b.json"), tool("b", &format!("w{i}"))).expect("write");
    }
    wait_visible(&registry, "b", "w19", Instant::now());
    quiet();
    let writes = registry.rebuilds() - before;
    println!(
        "  rebuilds for a burst of 20 rename-saves: {renames}; of 20 in-place writes: {writes}"
    );
}

fn full_reload_cost(others: usize) -> Duration {
    let (_dir, registry) = plain_dir(others);
    let mut costs: Vec<Duration> = (0..21)
        .map(|_| {
            let start = Instant::now();
            registry.reload();
            start.elapsed()
        })
        .collect();
    costs.sort();
    costs[10]
}

fn main() {
    // `cargo bench` passes `--bench`; anything numeric is ours.
    let numbers: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let trials = numbers.first().copied().unwrap_or(200);
    let counts: Vec<usize> = match numbers.get(1..) {
        Some(rest) if !rest.is_empty() => rest.to_vec(),
        _ => vec![50, 500],
    };
    for others in counts {
        println!(
            "reload: written -> visible through the real watcher, {others} other tools (5 commands each), {trials} trials"
        );
        new_files(trials, others).print("new file, renamed into place");
        rename_saves(trials, others).print("rename-save over a file");
        configmap_swaps(trials, others).print("ConfigMap ..data swap");
        in_place_writes(trials, others).print(&format!(
            "in-place write (settle {:?}, {IN_PLACE_BATCH} at once)",
            DEFAULT_SETTLE
        ));
        bursts(others);
        println!(
            "  reload() of every file (SIGHUP): median {:.2} ms",
            full_reload_cost(others).as_secs_f64() * 1e3
        );
    }
}
