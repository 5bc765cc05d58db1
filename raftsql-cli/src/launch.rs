//! Local clusters of `raftsql node` processes: what `raftsql dev`, the benches (`bench
//! failover`, `bench soak`) and the process tests (`raftsql-tests`' harness) start, stop,
//! kill and pause. One place knows how a node process is spawned (its log, its death with
//! its parent) and signalled.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How often [`NodeProcess::wait_exit`] looks.
const EXIT_POLL: Duration = Duration::from_millis(50);

/// One `raftsql` process; killed (SIGKILL) when dropped while it runs.
pub struct NodeProcess {
    child: Option<Child>,
    pid: u32,
}

impl NodeProcess {
    /// Runs `exe args`, its stdout and stderr appended to `log`, with `RAFTSQL_LOG` passed on
    /// (default `info`). The process dies with its parent (`PR_SET_PDEATHSIG`): a killed
    /// bench or test leaves no node behind holding its address.
    pub fn spawn<S: AsRef<OsStr>>(exe: &Path, args: &[S], log: &Path) -> io::Result<NodeProcess> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .env(
                "RAFTSQL_LOG",
                std::env::var("RAFTSQL_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // prctl(2), which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        Ok(NodeProcess {
            pid: child.id(),
            child: Some(child),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on the pid of our own child, which is not reaped yet (we hold its
        // `Child`), so the pid cannot have been reused by another process.
        unsafe { libc::kill(self.pid as i32, sig) };
    }

    /// SIGKILL, and reaps it.
    pub fn kill(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (a clean stop: a leader hands leadership over first); reaped in the
    /// background, so the node counts as gone at once.
    pub fn terminate(mut self) {
        if let Some(mut c) = self.child.take() {
            self.signal(libc::SIGTERM);
            std::thread::spawn(move || c.wait());
        }
    }

    /// SIGTERM, and waits for it to exit.
    pub fn stop(mut self) -> io::Result<ExitStatus> {
        let mut c = self.child.take().expect("a running process has its child");
        self.signal(libc::SIGTERM);
        c.wait()
    }

    /// SIGSTOP: the process stops in place (sockets open, nothing answered).
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`NodeProcess::pause`].
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// Its exit status if it has exited (reaped now), else `None`.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c.try_wait(),
            None => Ok(None),
        }
    }

    /// Waits up to `timeout` for it to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.try_wait() {
                return Some(st);
            }
            std::thread::sleep(EXIT_POLL);
        }
        None
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The nodes of one local cluster: node `i` (0-based) runs `exe args[i]` and appends to
/// `dir/node<i+1>.log`. Every running node is killed when this is dropped.
pub struct LocalCluster {
    dir: PathBuf,
    exe: PathBuf,
    args: Vec<Vec<String>>,
    procs: Vec<Option<NodeProcess>>,
}

impl LocalCluster {
    /// A cluster whose nodes run `exe` (nothing is started yet).
    pub fn new(dir: PathBuf, exe: PathBuf, args: Vec<Vec<String>>) -> LocalCluster {
        let procs = args.iter().map(|_| None).collect();
        LocalCluster {
            dir,
            exe,
            args,
            procs,
        }
    }

    /// The running `raftsql` binary (the nodes of `raftsql dev` and of the benches).
    pub fn this_exe() -> Result<PathBuf, String> {
        std::env::current_exe().map_err(|e| format!("finding this program: {e}"))
    }

    /// Node `i`'s log file.
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node{}.log", i + 1))
    }

    /// Starts node `i` (it must not be running).
    pub fn start(&mut self, i: usize) -> Result<(), String> {
        assert!(self.procs[i].is_none(), "node {} already running", i + 1);
        let p = NodeProcess::spawn(&self.exe, &self.args[i], &self.log_path(i))
            .map_err(|e| format!("starting node {}: {e}", i + 1))?;
        self.procs[i] = Some(p);
        Ok(())
    }

    /// Starts every node.
    pub fn start_all(&mut self) -> Result<(), String> {
        (0..self.procs.len()).try_for_each(|i| self.start(i))
    }

    /// The process id of node `i`, if it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.procs[i].as_ref().map(NodeProcess::pid)
    }

    /// SIGKILL node `i` (if it runs).
    pub fn kill(&mut self, i: usize) {
        if let Some(p) = self.procs[i].take() {
            p.kill();
        }
    }

    /// SIGTERM node `i` (if it runs); it counts as gone at once.
    pub fn terminate(&mut self, i: usize) {
        if let Some(p) = self.procs[i].take() {
            p.terminate();
        }
    }

    /// SIGTERM every node and wait for each to exit.
    pub fn stop_all(&mut self) {
        for p in self.procs.iter_mut().filter_map(Option::take) {
            let _ = p.stop();
        }
    }

    /// The nodes that exited on their own since the last call, with their status; they
    /// count as gone.
    pub fn exited(&mut self) -> Vec<(usize, ExitStatus)> {
        let mut out = Vec::new();
        for (i, slot) in self.procs.iter_mut().enumerate() {
            if let Some(Ok(Some(st))) = slot.as_mut().map(NodeProcess::try_wait) {
                *slot = None;
                out.push((i, st));
            }
        }
        out
    }

    /// How many nodes run.
    pub fn running(&self) -> usize {
        self.procs.iter().filter(|p| p.is_some()).count()
    }
}
