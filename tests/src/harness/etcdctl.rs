//! The one way tests run the real `etcdctl` (API v3): against an endpoint, with the
//! timeouts every test uses, optionally TLS flags and standard input.

use std::io::Write;
use std::process::{Command, Stdio};

/// What an `etcdctl` run printed.
#[derive(Debug)]
pub struct Output {
    /// It exited with success.
    pub ok: bool,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

impl Output {
    /// Standard output and error together.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Whether `etcdctl` is installed (tests that need it skip otherwise, outside CI).
pub fn available() -> bool {
    Command::new("etcdctl").arg("version").output().is_ok()
}

/// An `etcdctl` invocation against one or more endpoints.
pub struct Etcdctl {
    cmd: Command,
    stdin: Option<String>,
}

impl Etcdctl {
    /// `etcdctl --endpoints ENDPOINT` with a 10 s command timeout and a 3 s dial timeout.
    pub fn new(endpoint: &str) -> Etcdctl {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3").args([
            "--endpoints",
            endpoint,
            "--command-timeout=10s",
            "--dial-timeout=3s",
        ]);
        Etcdctl { cmd, stdin: None }
    }

    /// Adds arguments (flags such as `--cacert`, or the command).
    pub fn args<S: AsRef<std::ffi::OsStr>>(mut self, args: &[S]) -> Etcdctl {
        self.cmd.args(args);
        self
    }

    /// Feeds `s` on standard input.
    pub fn stdin(mut self, s: &str) -> Etcdctl {
        self.stdin = Some(s.to_string());
        self
    }

    /// Runs it to completion.
    pub fn run(mut self) -> Output {
        self.cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = self.cmd.spawn().expect("etcdctl (install etcd-client)");
        let input = child.stdin.take();
        if let (Some(mut w), Some(s)) = (input, self.stdin) {
            w.write_all(s.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        Output {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// Runs `etcdctl ARGS` against `endpoint`: (succeeded, stdout + stderr).
pub fn etcdctl(endpoint: &str, args: &[&str]) -> (bool, String) {
    let out = Etcdctl::new(endpoint).args(args).run();
    (out.ok, out.text())
}
