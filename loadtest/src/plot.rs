//! `loadtest plot`: a latency-percentile chart (SVG) of fan-out results, one line per
//! run and phase, x on a "nines" scale (p50, p90, p99, p99.9, max), y logarithmic in
//! milliseconds. Written by hand: a few polylines do not need a plotting crate.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

const WIDTH: f64 = 820.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 220.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLOURS: [&str; 16] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#7f7f7f", "#bcbd22", "#393b79", "#e7969c", "#637939", "#f7b6d2", "#843c39", "#9edae5",
];

/// x position of quantile `q`: -log10(1 - q), max drawn one step past p99.9.
fn nines(q: f64) -> f64 {
    if q >= 1.0 { 4.0 } else { -(1.0 - q).log10() }
}

struct Line {
    label: String,
    points: Vec<(f64, f64)>,
}

fn lines_of(run: &Value) -> Vec<Line> {
    let name = format!(
        "{} {}",
        run["target"].as_str().unwrap_or("?"),
        if run["event_kind"]
            .as_str()
            .is_some_and(|k| k.contains("durable"))
        {
            "durable"
        } else {
            ""
        }
    );
    let mut lines = Vec::new();
    for phase in ["steady", "burst"] {
        let Some(percentiles) = run["phases"][phase]["latency_percentiles_ms"].as_array() else {
            continue;
        };
        let points = percentiles
            .iter()
            .filter_map(|p| Some((nines(p["q"].as_f64()?), p["ms"].as_f64()?.max(0.001))))
            .collect();
        // the run's offered steady rate tells runs of one target apart
        let rate = run["phases"]["steady"]["offered_deliveries_per_s"]
            .as_f64()
            .map_or(String::new(), |rate| format!(" {:.0}k/s", rate / 1000.0));
        // and its server count, one peer from another
        let servers = run["servers"]
            .as_u64()
            .filter(|&n| n > 1)
            .map_or(String::new(), |n| format!("×{n}"));
        lines.push(Line {
            label: format!("{}{servers}{rate} {phase}", name.trim()),
            points,
        });
    }
    lines
}

/// Of a list of runs, the one whose steady p99 is the median.
fn median_run(runs: &Value) -> Option<&Value> {
    let mut runs: Vec<&Value> = runs.as_array()?.iter().collect();
    let p99 = |run: &Value| {
        run["phases"]["steady"]["latency_ms"]["p99"]
            .as_f64()
            .unwrap_or(0.0)
    };
    runs.sort_by(|a, b| p99(a).total_cmp(&p99(b)));
    runs.get(runs.len() / 2).copied()
}

pub fn run(files: &[PathBuf], out: &Path) -> Result<Value, String> {
    let mut lines = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let run: Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if run["target_runs"].is_array() {
            // a run against a peer: each side's median run (by steady p99)
            for side in ["target_runs", "peer_runs"] {
                if let Some(median) = median_run(&run[side]) {
                    lines.extend(lines_of(median));
                }
            }
        } else {
            lines.extend(lines_of(&run));
        }
    }
    if lines.is_empty() {
        return Err("no fan-out results with latency percentiles in the files given".into());
    }
    let (low, high) = lines
        .iter()
        .flat_map(|line| line.points.iter().map(|(_, ms)| *ms))
        .fold((f64::MAX, f64::MIN), |(lo, hi), ms| {
            (lo.min(ms), hi.max(ms))
        });
    let (low, high) = (
        low.log10().floor(),
        high.log10().ceil().max(low.log10().floor() + 1.0),
    );
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |n: f64| LEFT + n / 4.0 * plot_w;
    let y = |ms: f64| TOP + (high - ms.log10()) / (high - low) * plot_h;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="22" font-size="14">Fan-out latency by percentile (from intended send time)</text>"#
    );
    for (n, label) in [
        (0.301, "p50"),
        (1.0, "p90"),
        (2.0, "p99"),
        (3.0, "p99.9"),
        (4.0, "max"),
    ] {
        let _ = writeln!(
            svg,
            r##"<line x1="{0}" x2="{0}" y1="{TOP}" y2="{1}" stroke="#ddd"/><text x="{0}" y="{2}" text-anchor="middle">{label}</text>"##,
            x(n),
            TOP + plot_h,
            TOP + plot_h + 18.0
        );
    }
    let mut decade = low;
    while decade <= high {
        let ms = 10f64.powf(decade);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" x2="{0}" y1="{1}" y2="{1}" stroke="#ddd"/><text x="{2}" y="{3}" text-anchor="end">{ms} ms</text>"##,
            LEFT + plot_w,
            y(ms),
            LEFT - 6.0,
            y(ms) + 4.0
        );
        decade += 1.0;
    }
    for (i, line) in lines.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let dash = if line.label.contains(" burst") {
            r#" stroke-dasharray="6 3""#
        } else {
            ""
        };
        let points: Vec<String> = line
            .points
            .iter()
            .map(|(n, ms)| format!("{:.1},{:.1}", x(*n), y(*ms)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="{}"/>"#,
            points.join(" ")
        );
        let legend_y = TOP + 16.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<line x1="{0}" x2="{1}" y1="{legend_y}" y2="{legend_y}" stroke="{colour}" stroke-width="2"{dash}/><text x="{2}" y="{3}">{4}</text>"#,
            WIDTH - RIGHT + 15.0,
            WIDTH - RIGHT + 40.0,
            WIDTH - RIGHT + 45.0,
            legend_y + 4.0,
            xml_escape(&line.label)
        );
    }
    let _ = writeln!(svg, "</svg>");
    std::fs::write(out, svg).map_err(|e| format!("{}: {e}", out.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(json!({"scenario": "plot", "out": out.display().to_string(), "lines": lines.len()}))
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
