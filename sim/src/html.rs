//! Renders a run as a self-contained HTML timeline: one column per lane (faults, leaders,
//! each client), one row per simulated instant, the operations a checker blamed in red.
//!
//! Pure: takes a `RunReport`, returns text.

use crate::run::RunReport;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The HTML page for `report`.
pub fn render(report: &RunReport) -> String {
    let lanes: BTreeSet<String> = report.marks.iter().map(|m| m.lane.clone()).collect();
    // Fixed order: faults, leaders, then clients by number.
    let mut order: Vec<String> =
        ["faults", "leaders"].iter().map(|s| s.to_string()).filter(|l| lanes.contains(l)).collect();
    let mut clients: Vec<&String> = lanes.iter().filter(|l| l.starts_with("client ")).collect();
    clients.sort_by_key(|l| l.trim_start_matches("client ").parse::<i64>().unwrap_or(i64::MAX));
    order.extend(clients.into_iter().cloned());
    let column: BTreeMap<&str, usize> = order.iter().enumerate().map(|(i, l)| (l.as_str(), i)).collect();
    let bad: BTreeSet<usize> = report.bad_lines.iter().copied().collect();

    let mut rows: BTreeMap<u64, Vec<Vec<String>>> = BTreeMap::new();
    for m in &report.marks {
        let Some(col) = column.get(m.lane.as_str()) else { continue };
        let cells = rows.entry(m.at_us).or_insert_with(|| vec![Vec::new(); order.len()]);
        let class = match (m.line.is_some_and(|l| bad.contains(&l)), m.text.split_whitespace().next()) {
            (true, _) => "bad",
            (_, Some("ok")) => "ok",
            (_, Some("fail")) => "fail",
            (_, Some("info")) => "info",
            _ => "",
        };
        let line = m.line.map(|l| format!(" <span class=line>#{l}</span>")).unwrap_or_default();
        cells[*col].push(format!("<div class=\"{class}\">{}{line}</div>", escape(&m.text)));
    }

    let mut out = String::new();
    let _ = write!(
        out,
        "<!doctype html><meta charset=utf-8><title>floe-sim seed {seed}</title>\
<style>body{{font:12px monospace;margin:1em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ddd;padding:2px 4px;vertical-align:top}}\
th{{position:sticky;top:0;background:#f4f4f4}}.ok{{color:#075}}.fail{{color:#888}}.info{{color:#a60}}.bad{{background:#fcc;color:#900;font-weight:bold}}.line{{color:#999}}</style>\
<h1>floe-sim seed {seed}</h1><p>trace-hash {hash:016x} · {ok} ok / {failed} failed / {unknown} unknown operations · {faults} faults · simulated {sim:.1}s · verdict {verdict:?}</p>",
        seed = report.seed,
        hash = report.trace_hash,
        ok = report.ops_ok,
        failed = report.ops_failed,
        unknown = report.ops_unknown,
        faults = report.faults,
        sim = report.sim_time.as_secs_f64(),
        verdict = report.verdict,
    );
    if !report.violations.is_empty() {
        out.push_str("<h2>Violations</h2><ul>");
        for v in &report.violations {
            let _ = write!(out, "<li class=bad>{}</li>", escape(v));
        }
        out.push_str("</ul>");
    }
    out.push_str("<table><tr><th>time (ms)</th>");
    for l in &order {
        let _ = write!(out, "<th>{}</th>", escape(l));
    }
    out.push_str("</tr>");
    for (at, cells) in rows {
        let _ = write!(out, "<tr><td>{:.3}</td>", at as f64 / 1000.0);
        for c in cells {
            let _ = write!(out, "<td>{}</td>", c.join(""));
        }
        out.push_str("</tr>");
    }
    out.push_str("</table>");
    out
}
