//! The `hegraph` binary: the GUI when run without arguments, and a CLI for scripts and benchmarks.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    quiet_mesa();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Mesa's software drivers complain on every start when `XDG_RUNTIME_DIR` is unset (CI, containers, sudo);
/// give them a private one. Done first, before any thread exists, because it changes the environment.
fn quiet_mesa() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_some() {
        return;
    }
    let dir = std::env::temp_dir().join("hegraph-xdg-runtime");
    if std::fs::create_dir_all(&dir).is_ok() {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        }
        std::env::set_var("XDG_RUNTIME_DIR", &dir);
    }
}
