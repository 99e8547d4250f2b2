//! PNG plots from the results JSON, with `plotters` (pure-Rust bitmap backend and PNG encoder).
//!
//! Text is drawn with `ab_glyph` from a TrueType font found at run time (`$BLIP_BENCH_FONT`,
//! then DejaVu/Liberation/Noto under /usr/share/fonts, Debian's `fonts-dejavu-core`): no
//! fontconfig or freetype is linked. Without any font the plots are still drawn, without text.
//!
//! - `blackout-cdf-<mem>M.png`: blip vs QEMU, guest-observed blackout (solid, COM1 beats) and
//!   VMM-reported blackout (dashed: blip's `blackout_ns`, QEMU's `downtime`), one per memory size.
//! - `blackout-cdf-matrix.png`: VMM blackout of every cell of the migrate matrix.
//! - `blackout-phases.png`: blip's blackout phases, p50 of each, stacked per migrate cell.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use serde_json::Value;

const FONT: &str = "sans-serif";

/// Registers a TTF for plotters once; false when none was found.
fn font() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        let mut candidates: Vec<PathBuf> = std::env::var_os("BLIP_BENCH_FONT")
            .map(PathBuf::from)
            .into_iter()
            .collect();
        candidates.extend(
            [
                "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
                "/usr/share/fonts/TTF/DejaVuSans.ttf",
                "/usr/share/fonts/dejavu/DejaVuSans.ttf",
                "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
                "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
            ]
            .iter()
            .map(PathBuf::from),
        );
        candidates.extend(any_ttf(Path::new("/usr/share/fonts"), 4));
        for p in candidates {
            if let Ok(bytes) = std::fs::read(&p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

fn any_ttf(dir: &Path, depth: u32) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() && depth > 0 {
            out.extend(any_ttf(&p, depth - 1));
        } else if p.extension().is_some_and(|x| x.eq_ignore_ascii_case("ttf")) {
            out.push(p);
        }
    }
    out
}

/// One CDF line: a name, values in ns, colour, dashed or not.
struct Series {
    name: String,
    ns: Vec<u64>,
    color: RGBColor,
    dashed: bool,
}

/// A sample column of a cell's JSON, by name (nulls skipped).
fn column(cell: &Value, name: &str) -> Vec<u64> {
    let Some(i) = cell["samples_columns"]
        .as_array()
        .and_then(|c| c.iter().position(|x| x == name))
    else {
        return Vec::new();
    };
    cell["samples"]
        .as_array()
        .map(|rows| rows.iter().filter_map(|r| r[i].as_u64()).collect())
        .unwrap_or_default()
}

type PlotResult = Result<(), String>;

fn cdf_png(path: &Path, title: &str, series: &[Series]) -> PlotResult {
    let series: Vec<&Series> = series.iter().filter(|s| !s.ns.is_empty()).collect();
    if series.is_empty() {
        return Err("no samples".into());
    }
    let text = font();
    // QEMU reports downtime in whole ms, so "0" happens: such points sit at the left edge.
    let all = series.iter().flat_map(|s| s.ns.iter().copied());
    let lo = all.clone().filter(|&v| v >= 10_000).min().unwrap_or(10_000) as f64 / 1e3;
    let hi = all.max().unwrap_or(1).max(2) as f64 / 1e3;
    let (lo, hi) = (lo / 1.5, hi * 1.5);
    let root = BitMapBackend::new(path, (1000, 620)).into_drawing_area();
    let e = |e: &dyn std::fmt::Display| e.to_string();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut b = ChartBuilder::on(&root);
    b.margin(18);
    if text {
        b.caption(title, (FONT, 22))
            .x_label_area_size(48)
            .y_label_area_size(62);
    }
    let mut chart = b
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..1.02)
        .map_err(|x| e(&x))?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("blackout (log scale)")
            .y_desc("fraction of migrations ≤ x")
            .label_style((FONT, 15))
            .x_label_formatter(&|v| {
                // Only 1, 2 and 5 × 10^k: the log axis offers every integer multiple.
                let mant = v / 10f64.powf(v.log10().floor());
                if ![1.0, 2.0, 5.0].iter().any(|m| (mant - m).abs() < 0.05) {
                    String::new()
                } else if *v >= 1000.0 {
                    format!("{:.0} ms", v / 1000.0)
                } else {
                    format!("{v:.0} µs")
                }
            });
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|x| e(&x))?;
    for s in series {
        let mut v = s.ns.clone();
        v.sort_unstable();
        let n = v.len() as f64;
        let mut pts = Vec::with_capacity(2 * v.len());
        for (i, &x) in v.iter().enumerate() {
            let x = (x as f64 / 1e3).max(lo);
            pts.push((x, i as f64 / n));
            pts.push((x, (i + 1) as f64 / n));
        }
        let style = s.color.stroke_width(if s.dashed { 2 } else { 3 });
        let anno = if s.dashed {
            chart
                .draw_series(DashedLineSeries::new(pts, 8, 5, style))
                .map_err(|x| e(&x))?
        } else {
            chart
                .draw_series(LineSeries::new(pts, style))
                .map_err(|x| e(&x))?
        };
        if text {
            let (c, dashed) = (s.color, s.dashed);
            anno.label(format!("{} (n={})", s.name, v.len()))
                .legend(move |(x, y)| {
                    let st = c.stroke_width(3);
                    if dashed {
                        PathElement::new(vec![(x, y), (x + 8, y)], st)
                    } else {
                        PathElement::new(vec![(x, y), (x + 22, y)], st)
                    }
                });
        }
    }
    if text {
        chart
            .configure_series_labels()
            .label_font((FONT, 15))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))
}

const PHASES: [(&str, &str); 7] = [
    ("pause", "pause"),
    ("final_harvest", "final harvest"),
    ("final_pages", "final pages"),
    ("state_save", "state save"),
    ("transfer_restore", "transfer + restore"),
    ("resume", "resume"),
    ("unaccounted", "other"),
];

fn phases_png(path: &Path, cells: &[(String, Vec<f64>)]) -> PlotResult {
    if cells.is_empty() {
        return Err("no migrate cells".into());
    }
    let text = font();
    let ymax = cells
        .iter()
        .map(|(_, v)| v.iter().sum::<f64>())
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.3;
    let root = BitMapBackend::new(path, (1000, 620)).into_drawing_area();
    let e = |e: &dyn std::fmt::Display| e.to_string();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let n = cells.len() as u32;
    let mut b = ChartBuilder::on(&root);
    b.margin(18);
    if text {
        b.caption("blip blackout phases (p50 of each phase)", (FONT, 22))
            .x_label_area_size(48)
            .y_label_area_size(62);
    }
    let mut chart = b
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..ymax)
        .map_err(|x| e(&x))?;
    let names: Vec<String> = cells.iter().map(|(n, _)| n.clone()).collect();
    // Bars sit on whole numbers; other key points of the axis get no label.
    let fmt = move |v: &f64| {
        if (v - v.round()).abs() < 1e-6 && *v >= 0.0 {
            names.get(v.round() as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    let mut mesh = chart.configure_mesh();
    mesh.disable_x_mesh();
    if text {
        mesh.y_desc("µs")
            .label_style((FONT, 14))
            .x_labels(cells.len() * 2 + 1)
            .x_label_formatter(&fmt);
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|x| e(&x))?;
    for (k, (_, label)) in PHASES.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        let rects: Vec<Rectangle<(f64, f64)>> = cells
            .iter()
            .enumerate()
            .map(|(i, (_, v))| {
                let y0: f64 = v[..k].iter().sum();
                let y1 = y0 + v[k];
                let x = i as f64;
                Rectangle::new([(x - 0.3, y0), (x + 0.3, y1)], color.filled())
            })
            .collect();
        let anno = chart.draw_series(rects).map_err(|x| e(&x))?;
        if text {
            anno.label(*label).legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled())
            });
        }
    }
    if text {
        chart
            .configure_series_labels()
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))
}

const BLIP: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const QEMU: [RGBColor; 3] = [
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
];

/// Draws every plot the results allow; returns the files written (errors on stderr, never
/// fatal).
pub fn all(out: &Path, results: &Value) -> Vec<PathBuf> {
    let mut written = Vec::new();
    let mut done = |p: PathBuf, r: PlotResult| match r {
        Ok(()) => written.push(p),
        Err(e) => eprintln!("blip-bench: plot {}: {e}", p.display()),
    };
    if !font() {
        eprintln!(
            "blip-bench: no TrueType font found (install fonts-dejavu-core or set BLIP_BENCH_FONT): plots have no text"
        );
    }
    // (a) blip vs QEMU, per memory size.
    if let Some(cmp) = results["qemu"]["cells"].as_array() {
        let blip = results["qemu"]["blip_cells"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut mems: Vec<u64> = blip
            .iter()
            .chain(cmp)
            .filter_map(|c| c["mem_mib"].as_u64())
            .collect();
        mems.sort_unstable();
        mems.dedup();
        for mem in mems {
            let mut series = Vec::new();
            for c in blip.iter().filter(|c| c["mem_mib"] == mem) {
                series.push(Series {
                    name: "blip guest-observed".into(),
                    ns: column(c, "guest_serial_blackout_ns"),
                    color: BLIP,
                    dashed: false,
                });
                series.push(Series {
                    name: "blip VMM blackout".into(),
                    ns: column(c, "blackout_ns"),
                    color: BLIP,
                    dashed: true,
                });
            }
            for (i, c) in cmp.iter().filter(|c| c["mem_mib"] == mem).enumerate() {
                let lim = c["downtime_limit_ms"].as_u64().unwrap_or(0);
                let color = QEMU[i % QEMU.len()];
                series.push(Series {
                    name: format!("QEMU (downtime-limit {lim} ms) guest-observed"),
                    ns: column(c, "guest_serial_blackout_ns"),
                    color,
                    dashed: false,
                });
                series.push(Series {
                    name: format!("QEMU (downtime-limit {lim} ms) downtime"),
                    ns: column(c, "downtime_ns"),
                    color,
                    dashed: true,
                });
            }
            let p = out.join(format!("blackout-cdf-{mem}M.png"));
            let title = format!(
                "Blackout CDF, {mem} MiB, 1 vCPU, dirty 16 MiB at max rate: blip vs QEMU (same run)"
            );
            let r = cdf_png(&p, &title, &series);
            done(p, r);
        }
    }
    // The migrate matrix (VMM blackout per cell) and the phase breakdown of every blip cell.
    let mut blip_cells: Vec<Value> = results["migrate"]["cells"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    blip_cells.extend(
        results["qemu"]["blip_cells"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
    );
    let label = |c: &Value| {
        format!(
            "{}M {}v {}{}{}",
            c["mem_mib"],
            c["vcpus"],
            c["workload"].as_str().unwrap_or("?"),
            match (c["dirty_tracking"].as_str(), c["transport"].as_str()) {
                (Some("bitmap"), Some("rdma")) => " bitmap rdma",
                (Some("bitmap"), _) => " bitmap",
                (_, Some("rdma")) => " rdma",
                _ => "",
            },
            if c["cmdline"]
                .as_str()
                .is_some_and(|s| s.contains("via=serial"))
            {
                " (serial)"
            } else {
                ""
            }
        )
    };
    if let Some(cells) = results["migrate"]["cells"].as_array() {
        let series: Vec<Series> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| Series {
                name: label(c),
                ns: column(c, "blackout_ns"),
                color: {
                    let (r, g, b) = Palette99::pick(i).to_rgba().rgb();
                    RGBColor(r, g, b)
                },
                dashed: false,
            })
            .collect();
        let p = out.join("blackout-cdf-matrix.png");
        let r = cdf_png(&p, "blip VMM blackout CDF, migrate matrix", &series);
        done(p, r);
    }
    let phases: Vec<(String, Vec<f64>)> = blip_cells
        .iter()
        .filter(|c| c["migrations_ok"].as_u64().unwrap_or(0) > 0)
        .map(|c| {
            let v = PHASES
                .iter()
                .map(|(k, _)| {
                    c["histograms"]["phases_ns"][k]["p50"]
                        .as_f64()
                        .unwrap_or(0.0)
                        / 1e3
                })
                .collect();
            (label(c), v)
        })
        .collect();
    if !phases.is_empty() {
        let p = out.join("blackout-phases.png");
        let r = phases_png(&p, &phases);
        done(p, r);
    }
    written
}
