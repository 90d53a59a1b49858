//! Running the external tools (`ip`, `sysctl`) that build the test bed, with errors that name the command.

use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// Runs `program args…` to completion and returns its stdout.
///
/// Fails, naming the whole command line and quoting its stderr, when it cannot be started or
/// exits unsuccessfully.
pub(crate) fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let line = command_line(program, args);
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!("`{line}` failed ({}): {}", out.status, stderr.trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip args…`.
pub(crate) fn ip(args: &[&str]) -> anyhow::Result<String> {
    run("ip", args)
}

fn command_line(program: &str, args: &[&str]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_returns_stdout() {
        assert_eq!(run("echo", &["hi", "there"]).unwrap(), "hi there\n");
    }

    #[test]
    fn failure_names_command_and_stderr() {
        let err = run("sh", &["-c", "echo boom >&2; exit 3"]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("`sh -c echo boom >&2; exit 3`"), "{msg}");
        assert!(msg.contains("boom"), "{msg}");
        assert!(msg.contains('3'), "{msg}");
    }

    #[test]
    fn missing_program_is_named() {
        let err = run("ztb-no-such-program", &["x"]).unwrap_err();
        assert!(
            format!("{err:#}").contains("`ztb-no-such-program x`"),
            "{err:#}"
        );
    }
}
