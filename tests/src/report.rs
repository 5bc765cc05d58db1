//! The report of a fault-test run: a directory with the history (`history.jsonl`), the
//! faults (`faults.jsonl`), the verdict (`verdict.txt`) and two pictures a reader can open in
//! a browser: `latency.svg` (every operation's latency over time, log scale, coloured by
//! outcome) and `throughput.svg` (completed operations per second), both with the fault
//! windows shaded.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::linearizability::{Op, Outcome};

/// One operation of a history, as the report sees it.
pub trait Record {
    /// Invocation time, microseconds since the run's start.
    fn invoked_us(&self) -> u64;
    /// Completion time (for an unknown outcome: when the client gave up).
    fn completed_us(&self) -> u64;
    /// Whether the client got an answer.
    fn ok(&self) -> bool;
    /// The operation as one line of `history.jsonl`.
    fn json(&self) -> serde_json::Value;
}

/// An operation described in words (for workloads without a checker-specific type).
#[derive(Clone, Debug)]
pub struct Plain {
    /// The client that ran it.
    pub client: u64,
    /// What it did, e.g. "transfer 5 from 1 to 3".
    pub what: String,
    /// Invocation time, microseconds since the start.
    pub invoked: u64,
    /// Completion time.
    pub completed: u64,
    /// Whether it was answered.
    pub ok: bool,
}

impl Record for Plain {
    fn invoked_us(&self) -> u64 {
        self.invoked
    }
    fn completed_us(&self) -> u64 {
        self.completed
    }
    fn ok(&self) -> bool {
        self.ok
    }
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "client": self.client, "what": self.what, "invoked_us": self.invoked,
            "completed_us": self.completed, "ok": self.ok,
        })
    }
}

impl Record for Op {
    fn invoked_us(&self) -> u64 {
        self.invoked
    }
    fn completed_us(&self) -> u64 {
        self.completed
    }
    fn ok(&self) -> bool {
        self.outcome == Outcome::Ok
    }
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "client": self.client, "key": self.key, "action": format!("{:?}", self.action),
            "invoked_us": self.invoked, "completed_us": self.completed,
            "outcome": format!("{:?}", self.outcome),
        })
    }
}

/// A fault window, in microseconds since the run's start.
#[derive(Clone, Debug)]
pub struct Window {
    /// What was done.
    pub what: String,
    /// Start.
    pub from_us: u64,
    /// End (healed).
    pub to_us: u64,
}

const W: f64 = 1000.0;
const H: f64 = 360.0;
const LEFT: f64 = 60.0;
const BOTTOM: f64 = 30.0;
const TOP: f64 = 20.0;

fn frame(title: &str, end_us: u64, faults: &[Window], y_label: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="14" font-size="13">{title}</text>"#
    );
    let x = |t: u64| LEFT + (W - LEFT - 10.0) * t as f64 / end_us.max(1) as f64;
    for f in faults {
        let (a, b) = (x(f.from_us), x(f.to_us));
        let _ = writeln!(
            s,
            r##"<rect x="{a:.1}" y="{TOP}" width="{:.1}" height="{:.1}" fill="#f4c7c3" opacity="0.6"><title>{}</title></rect>"##,
            (b - a).max(1.0),
            H - TOP - BOTTOM,
            f.what
        );
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{}" fill="#a33" font-size="9">{}</text>"##,
            a + 2.0,
            TOP + 10.0,
            f.what
        );
    }
    // Axes and a time scale every 5 s.
    let _ = writeln!(
        s,
        r#"<line x1="{LEFT}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#,
        H - BOTTOM,
        W - 10.0,
        H - BOTTOM
    );
    let _ = writeln!(
        s,
        r#"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{}" stroke="black"/>"#,
        H - BOTTOM
    );
    let mut t = 0;
    while t <= end_us {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}s</text>"#,
            x(t),
            H - BOTTOM + 14.0,
            t / 1_000_000
        );
        t += 5_000_000;
    }
    let _ = writeln!(
        s,
        r#"<text x="12" y="{}" transform="rotate(-90 12 {})" text-anchor="middle">{y_label}</text>"#,
        H / 2.0,
        H / 2.0
    );
    s
}

/// The latency picture: one dot per operation at its invocation time.
pub fn latency_svg<R: Record>(ops: &[R], faults: &[Window], title: &str) -> String {
    let end = ops.iter().map(|o| o.completed_us()).max().unwrap_or(1);
    let mut s = frame(title, end, faults, "latency (ms, log)");
    let x = |t: u64| LEFT + (W - LEFT - 10.0) * t as f64 / end.max(1) as f64;
    // Log scale from 0.1 ms to 10 s.
    let y = |ms: f64| {
        let l = (ms.max(0.1).log10() + 1.0) / 5.0;
        (H - BOTTOM) - (H - TOP - BOTTOM) * l.min(1.0)
    };
    for ms in [0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0] {
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="#ddd"/><text x="{2}" y="{0:.1}" text-anchor="end">{ms}</text>"##,
            y(ms),
            W - 10.0,
            LEFT - 4.0
        );
    }
    for o in ops {
        let ms = o.completed_us().saturating_sub(o.invoked_us()) as f64 / 1000.0;
        let colour = if o.ok() { "#2a7ab0" } else { "#e08e0b" };
        let _ = writeln!(
            s,
            r#"<circle cx="{:.1}" cy="{:.1}" r="1.2" fill="{colour}"/>"#,
            x(o.invoked_us()),
            y(ms)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The throughput picture: completed operations per 250 ms, as operations per second.
pub fn throughput_svg<R: Record>(ops: &[R], faults: &[Window], title: &str) -> String {
    let end = ops.iter().map(|o| o.completed_us()).max().unwrap_or(1);
    let bucket = 250_000u64;
    let n = (end / bucket + 1) as usize;
    let mut counts = vec![0u64; n];
    for o in ops.iter().filter(|o| o.ok()) {
        counts[(o.completed_us() / bucket) as usize] += 1;
    }
    let max = counts.iter().copied().max().unwrap_or(1).max(1) as f64 * 4.0;
    let mut s = frame(title, end, faults, "ok operations / s");
    let x = |t: u64| LEFT + (W - LEFT - 10.0) * t as f64 / end.max(1) as f64;
    let y = |v: f64| (H - BOTTOM) - (H - TOP - BOTTOM) * v / max;
    for frac in [0.25, 0.5, 0.75, 1.0] {
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="#ddd"/><text x="{2}" y="{0:.1}" text-anchor="end">{3:.0}</text>"##,
            y(max * frac),
            W - 10.0,
            LEFT - 4.0,
            max * frac
        );
    }
    let points: Vec<String> = counts
        .iter()
        .enumerate()
        .map(|(i, c)| {
            format!(
                "{:.1},{:.1}",
                x(i as u64 * bucket + bucket / 2),
                y(*c as f64 * 4.0)
            )
        })
        .collect();
    let _ = writeln!(
        s,
        r##"<polyline points="{}" fill="none" stroke="#2a7ab0" stroke-width="1.5"/>"##,
        points.join(" ")
    );
    s.push_str("</svg>\n");
    s
}

/// Writes the report of a run into a new directory under `root` (`<name>-<unix seconds>`).
/// Returns the directory.
pub fn write<R: Record>(
    root: &Path,
    name: &str,
    ops: &[R],
    faults: &[Window],
    verdict: &str,
) -> std::io::Result<PathBuf> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let dir = root.join(format!("{name}-{secs}"));
    std::fs::create_dir_all(&dir)?;
    let mut h = String::new();
    for o in ops {
        let _ = writeln!(h, "{}", o.json());
    }
    std::fs::write(dir.join("history.jsonl"), h)?;
    let mut f = String::new();
    for w in faults {
        let _ = writeln!(
            f,
            "{}",
            serde_json::json!({"what": w.what, "from_us": w.from_us, "to_us": w.to_us})
        );
    }
    std::fs::write(dir.join("faults.jsonl"), f)?;
    std::fs::write(dir.join("verdict.txt"), verdict)?;
    std::fs::write(
        dir.join("latency.svg"),
        latency_svg(ops, faults, &format!("{name}: latency")),
    )?;
    std::fs::write(
        dir.join("throughput.svg"),
        throughput_svg(ops, faults, &format!("{name}: throughput")),
    )?;
    Ok(dir)
}
