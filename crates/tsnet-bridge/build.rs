//! Builds the Go tsnet bridge (`go/`) as a C archive with
//! `go build -buildmode=c-archive` into OUT_DIR and links it.
//!
//! Needs Go >= 1.26.6 (the `go` directive of the pinned tailscale.com) and a C
//! compiler for cgo. `GO` names the go binary if it is not `go` on PATH.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// The oldest Go that builds the pinned tailscale.com release.
const MIN_GO: (u32, u32, u32) = (1, 26, 6);
const BRIDGE_DIR: &str = "go";

fn main() -> ExitCode {
    match build() {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("\nerror: building the tsnet bridge failed\n\n{msg}\n");
            ExitCode::FAILURE
        }
    }
}

fn build() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let bridge = manifest_dir.join(BRIDGE_DIR);
    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={BRIDGE_DIR}");
    for file in bridge_files(&bridge)? {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    for var in [
        "GO",
        "GOFLAGS",
        "GOPROXY",
        "GONOSUMDB",
        "GOPRIVATE",
        "GONOPROXY",
        "GOSUMDB",
        "GOPATH",
        "GOMODCACHE",
        "GOCACHE",
        "CC",
        "CGO_CFLAGS",
        "CGO_LDFLAGS",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let go = env::var("GO").unwrap_or_else(|_| "go".to_string());
    check_go_version(&go)?;

    let goarch = match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "amd64",
        Ok("aarch64") => "arm64",
        other => {
            return Err(format!(
                "unsupported target architecture {other:?} (the bridge is built for x86_64 and aarch64 Linux)"
            ));
        }
    };
    if env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return Err("the tsnet bridge is only built for Linux targets".into());
    }

    // netgo/osusergo: Go's own resolver and user lookups, no libc NSS calls
    // from Go threads and no libresolv to link.
    // ts_omit_peerapiserver: in userspace (netstack) mode tsnet's PeerAPI
    // server opens a kernel TCP listener on 0.0.0.0 for every node; tailkitd
    // must bind no host port, and needs none of PeerAPI's services (Taildrop,
    // exit-node DNS).
    // ts_omit_oauthkey: without it, tsnet hands a node's missing auth key
    // over to an OAuth hook that falls back to TS_CLIENT_SECRET from the
    // environment (and mints keys through Tailscale's API); tailkitd takes
    // its key from its own settings only.
    let mut tags = vec![
        "netgo",
        "osusergo",
        "ts_omit_peerapiserver",
        "ts_omit_oauthkey",
    ];
    if env::var_os("CARGO_FEATURE_LOCALNET").is_some() {
        tags.push("tailkitd_localnet");
    }

    let archive = out_dir.join("libtsnetbridge.a");
    let mut cmd = Command::new(&go);
    cmd.current_dir(&bridge)
        .args(["build", "-buildmode=c-archive", "-trimpath"])
        // rlimit.go reads syscall.origRlimitNofile by go:linkname, which
        // Go's linker refuses by default (the variable is not marked for
        // it); the bridge depends on no other such pull.
        .arg("-ldflags=-checklinkname=0")
        .arg(format!("-tags={}", tags.join(",")))
        .arg("-o")
        .arg(&archive)
        .arg(".")
        // Never fetch a different toolchain behind the user's back.
        .env("GOTOOLCHAIN", "local")
        .env("CGO_ENABLED", "1")
        .env("GOOS", "linux")
        .env("GOARCH", goarch);
    // Captured: a build script's stdout is read by cargo.
    let out = cmd
        .output()
        .map_err(|e| format!("could not run `{go} build`: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{go} build -buildmode=c-archive` in {} failed ({}):\n{}\n\
             The first build downloads tailscale.com and its dependencies through the Go module proxy.",
            bridge.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end(),
        ));
    }

    println!("cargo:rustc-link-search=native={}", out_dir.display());
    println!("cargo:rustc-link-lib=static=tsnetbridge");
    println!("cargo:rustc-link-lib=dylib=pthread");
    Ok(())
}

/// Every file under the bridge directory (it has no subdirectories that
/// matter, but walk them anyway).
fn bridge_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| format!("reading {}: {e}", d.display()))?;
        for entry in entries {
            let path = entry.map_err(|e| e.to_string())?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

fn check_go_version(go: &str) -> Result<(), String> {
    let (a, b, c) = MIN_GO;
    let install = format!(
        "tailkitd links tailscale.com's tsnet through a small Go bridge, so building it needs \
         Go >= {a}.{b}.{c} and a C compiler (cgo).\n\
         Install Go from https://go.dev/dl/ (or your distribution, if it is new enough) and put \
         `go` on PATH, or set GO=/path/to/go."
    );
    let out = Command::new(go)
        .args(["env", "GOVERSION"])
        .env("GOTOOLCHAIN", "local")
        .output()
        .map_err(|e| format!("`{go}` was not found or could not run ({e}).\n\n{install}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{go} env GOVERSION` failed: {}\n\n{install}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match parse_go_version(&version) {
        Some(v) if v >= MIN_GO => Ok(()),
        Some(_) => Err(format!("found {version}, which is too old.\n\n{install}")),
        // A development build ("devel go1.27-abcdef ...") is assumed new enough.
        None if version.contains("devel") => Ok(()),
        None => Err(format!(
            "could not understand the Go version {version:?}.\n\n{install}"
        )),
    }
}

/// "go1.26.8" -> (1, 26, 8); "go1.27rc1" -> (1, 27, 0).
fn parse_go_version(v: &str) -> Option<(u32, u32, u32)> {
    let rest = v.strip_prefix("go")?;
    let mut parts = rest.split('.');
    let num = |s: Option<&str>| -> Option<u32> {
        let s = s?;
        let digits: String = s.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse().ok()
    };
    let major = num(parts.next())?;
    let minor = num(parts.next())?;
    let patch = num(parts.next()).unwrap_or(0);
    Some((major, minor, patch))
}
