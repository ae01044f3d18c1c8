//! `cargo xtask`: the project's build and test driver, so that the README's
//! two commands work on a fresh machine.
//!
//! - `cargo xtask wasm`: add the wasm32-wasip2 target if missing, build every
//!   connector component (the Python example with componentize-py, from
//!   PyPI into `target/pyenv`), and install each with its hash into
//!   `target/plugins/<id>/`.
//! - `cargo xtask demo`: the above, then `ledgerport demo`.
//! - `cargo xtask test`: everything CI checks: formatting, lints, the
//!   connectors, the Rust test suite (host, simulator, connectors) and the
//!   simulator's Python fidelity tests.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// Connector crates built for wasm32-wasip2: (package, artifact stem,
/// source manifest to install with, if any).
const CONNECTORS: &[(&str, &str, Option<&str>)] = &[
    (
        "minimal-connector",
        "minimal_connector",
        Some("examples/minimal-connector/manifest.toml"),
    ),
    (
        "webhook-connector",
        "webhook_connector",
        Some("examples/webhook-connector/manifest.toml"),
    ),
    (
        "xero-connector",
        "xero_connector",
        Some("plugins/xero/manifest.toml"),
    ),
    ("hostile-connector", "hostile_connector", None),
    ("extra-import-connector", "extra_import_connector", None),
    ("v02-connector", "v02_connector", None),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn run(cmd: &mut Command) -> Result<(), String> {
    eprintln!("xtask: running {:?}", cmd);
    let status = cmd
        .current_dir(root())
        .status()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed with {status}"))
    }
}

fn has_wasm_target() -> bool {
    Command::new("rustup")
        .args(["target", "list", "--installed"])
        .current_dir(root())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == "wasm32-wasip2")
        })
        .unwrap_or(false)
}

fn wasm() -> Result<(), String> {
    if !has_wasm_target() {
        run(Command::new("rustup").args(["target", "add", "wasm32-wasip2"]))?;
    }
    // One build per connector, as its author would build it: built
    // together, cargo unifies features across them (the Xero connector's
    // serde_json `arbitrary_precision` made the minimal one 60 % bigger and
    // slower), and `--crate-type cdylib` leaves out the rlib that native
    // tests and benchmarks use (with it, the component comes out larger).
    for (pkg, _, _) in CONNECTORS {
        run(Command::new(cargo()).args([
            "rustc",
            "-q",
            "-p",
            pkg,
            "--target",
            "wasm32-wasip2",
            "--profile",
            "wasm",
            "--crate-type",
            "cdylib",
        ]))?;
    }
    run(Command::new(cargo()).args(["build", "-p", "ledgerport"]))?;
    let ledgerport = target_dir().join("debug/ledgerport");
    for (_, stem, manifest) in CONNECTORS {
        let Some(manifest) = manifest else { continue };
        let wasm = target_dir().join(format!("wasm32-wasip2/wasm/{stem}.wasm"));
        run(Command::new(&ledgerport)
            .args(["plugin", "install", manifest, "--component"])
            .arg(&wasm)
            .arg("--dir")
            .arg(target_dir().join("plugins")))?;
    }
    // The Python connector is installed beside, not into, the daemon's
    // plugin directory: its 18 MB component takes ~30 s to compile, which
    // every daemon start (the demo, each daemon test) would otherwise pay.
    let python = python_connector()?;
    run(Command::new(&ledgerport)
        .args([
            "plugin",
            "install",
            "examples/python-connector/manifest.toml",
            "--component",
        ])
        .arg(&python)
        .arg("--dir")
        .arg(target_dir().join("plugins-extra")))?;
    Ok(())
}

/// The project's Python venv (`target/pyenv`), created when missing; returns
/// its interpreter.
fn pyenv() -> Result<PathBuf, String> {
    let venv = target_dir().join("pyenv");
    if !venv.join("bin/python").exists() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    Ok(venv.join("bin/python"))
}

/// The example connector written in Python: componentize-py (pinned in the
/// example's requirements.txt, installed into the venv) turns `app.py` into
/// a component against the same WIT as the Rust connectors. WASI imports
/// are replaced by trapping stubs (`--stub-wasi`): the component imports
/// the contract only. Rebuilt only when an input is newer than the output.
fn python_connector() -> Result<PathBuf, String> {
    let dir = root().join("examples/python-connector");
    let py = pyenv()?;
    run(Command::new(&py)
        .args(["-m", "pip", "install", "-q", "-r"])
        .arg(dir.join("requirements.txt")))?;
    let out = target_dir().join("wasm32-wasip2/wasm/python_connector.wasm");
    let tool = py.with_file_name("componentize-py");
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let inputs = [
        dir.join("app.py"),
        dir.join("requirements.txt"),
        root().join("wit/v0.1/connector.wit"),
        tool.clone(),
    ];
    let fresh = mtime(&out).is_some_and(|built| inputs.iter().all(|i| mtime(i) < Some(built)));
    if !fresh {
        std::fs::create_dir_all(out.parent().expect("wasm dir")).map_err(|e| e.to_string())?;
        run(Command::new(&tool)
            .args([
                "-q",
                "-d",
                "wit/v0.1",
                "-w",
                "plugin",
                "componentize",
                "app",
            ])
            .args(["--stub-wasi", "-p"])
            .arg(&dir)
            .arg("-o")
            .arg(&out)
            .env("PYTHONDONTWRITEBYTECODE", "1"))?;
    }
    Ok(out)
}

fn python_tests() -> Result<(), String> {
    let py_dir = root().join("tests/xero-sim/py");
    if !py_dir.join("requirements.txt").exists() {
        return Ok(());
    }
    let py = pyenv()?;
    run(Command::new(&py)
        .args(["-m", "pip", "install", "-q", "-r"])
        .arg(py_dir.join("requirements.txt")))?;
    // The workspace's feature set (what the test run built), not the
    // package's own: `-p xero-sim` would rebuild its dependencies.
    run(Command::new(cargo()).args(["build", "--bin", "xero-sim"]))?;
    run(suite(Command::new(&py).args(["-m", "pytest", "-q"]))
        .arg(&py_dir)
        .env("XERO_SIM_BIN", target_dir().join("debug/xero-sim")))
}

/// A test suite's command: told `CI=true` when nothing may be skipped.
fn suite(cmd: &mut Command) -> &mut Command {
    if strict() {
        cmd.env("CI", "true");
    }
    cmd
}

/// Whether an environment variable is set to something true.
fn truthy(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Whether a test whose service or tool is missing fails (the default, and
/// always under CI) rather than saying it is skipped and passing:
/// `LEDGERPORT_ALLOW_SKIP=1` allows skipping, for a machine without
/// PostgreSQL or root. The suites learn it as `CI=true`.
fn strict() -> bool {
    truthy("CI") || !truthy("LEDGERPORT_ALLOW_SKIP")
}

/// Debian's Chromium and the npm package that drives it, for the browser
/// test. Missing pieces are installed; a failed install fails the run
/// unless skipping is allowed ([`strict`]).
fn browser_prereqs() -> Result<(), String> {
    let ci = strict();
    let soft = |r: Result<(), String>| match r {
        Err(e) if !ci => {
            eprintln!("xtask: warning: {e}; the browser test will be skipped");
            Ok(())
        }
        other => other,
    };
    if !Path::new("/usr/bin/chromium").exists() {
        soft(
            run(Command::new("apt-get").args(["update", "-qq"])).and_then(|_| {
                run(Command::new("apt-get")
                    .args(["install", "-y", "-qq", "chromium"])
                    .env("DEBIAN_FRONTEND", "noninteractive"))
            }),
        )?;
    }
    let browser = root().join("tests/browser");
    if !browser.join("node_modules/playwright-core").exists() {
        soft(run(Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--prefix"])
            .arg(&browser)))?;
    }
    Ok(())
}

fn test() -> Result<(), String> {
    run(Command::new(cargo()).args(["fmt", "--all", "--check"]))?;
    wasm()?;
    run(Command::new(cargo()).args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    run(Command::new(cargo()).args([
        "clippy",
        "--target",
        "wasm32-wasip2",
        "--profile",
        "wasm",
        "-p",
        "ledgerport-sdk",
        "-p",
        "minimal-connector",
        "-p",
        "webhook-connector",
        "-p",
        "xero-connector",
        "--",
        "-D",
        "warnings",
    ]))?;
    browser_prereqs()?;
    // What the suites leave for later checks (screenshots, the connector's
    // requests for the schema check) must come from this run.
    for dir in ["screenshots", "connector-requests"] {
        let _ = std::fs::remove_dir_all(target_dir().join(dir));
    }
    let nextest = Command::new(cargo())
        .args(["nextest", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if nextest {
        run(suite(Command::new(cargo()).args([
            "nextest",
            "run",
            "--no-fail-fast",
        ])))?;
        run(Command::new(cargo()).args(["test", "--doc"]))?;
    } else {
        run(suite(
            Command::new(cargo()).args(["test", "--no-fail-fast"]),
        ))?;
    }
    python_tests()
}

fn main() -> ExitCode {
    let arg = std::env::args().nth(1).unwrap_or_default();
    let result = match arg.as_str() {
        "wasm" => wasm(),
        "test" => test(),
        "demo" => wasm()
            .and_then(|_| run(Command::new(target_dir().join("debug/ledgerport")).arg("demo"))),
        _ => Err("usage: cargo xtask <wasm|test|demo>".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}
