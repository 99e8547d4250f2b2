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

/// Twelve colours far apart (Tableau 10 and two dark ones): with a dash for the second
/// platform and a marker shape at each median, 12+ series stay apart.
const PALETTE: [RGBColor; 12] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x17, 0xbe, 0xcf),
    RGBColor(0x00, 0x00, 0x00),
    RGBColor(0x00, 0x3f, 0x7f),
];

/// A legend entry drawn below a chart: name, colour, and its swatch.
struct Entry {
    name: String,
    color: RGBColor,
    swatch: Swatch,
}

#[derive(Clone, Copy)]
enum Swatch {
    Line { dashed: bool, marker: Option<usize> },
    Box,
}

/// Height of a legend of `n` entries in `cols` columns.
fn legend_height(n: usize, cols: usize) -> u32 {
    (n.div_ceil(cols) as u32) * 22 + 12
}

/// Draws `entries` in `cols` columns on `area` (below the chart: it never covers data).
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    entries: &[Entry],
    cols: usize,
) -> PlotResult {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let (w, _) = area.dim_in_pixel();
    let col_w = (w as i32 - 40) / cols as i32;
    for (i, en) in entries.iter().enumerate() {
        let x = 30 + (i % cols) as i32 * col_w;
        let y = 12 + (i / cols) as i32 * 22;
        match en.swatch {
            Swatch::Line { dashed, marker } => {
                let st = en.color.stroke_width(3);
                if dashed {
                    for k in 0..3 {
                        area.draw(&PathElement::new(
                            vec![(x + k * 11, y), (x + k * 11 + 7, y)],
                            st,
                        ))
                        .map_err(|x| e(&x))?;
                    }
                } else {
                    area.draw(&PathElement::new(vec![(x, y), (x + 30, y)], st))
                        .map_err(|x| e(&x))?;
                }
                if let Some(m) = marker {
                    draw_marker(area, (x + 15, y), m, en.color).map_err(|x| e(&x))?;
                }
            }
            Swatch::Box => {
                area.draw(&Rectangle::new(
                    [(x, y - 7), (x + 30, y + 7)],
                    en.color.filled(),
                ))
                .map_err(|x| e(&x))?;
            }
        }
        area.draw(&Text::new(
            en.name.clone(),
            (x + 38, y - 8),
            (FONT, 15).into_font(),
        ))
        .map_err(|x| e(&x))?;
    }
    Ok(())
}

/// A marker shape (circle, triangle, square, cross) at a pixel position.
fn draw_marker<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    at: (i32, i32),
    shape: usize,
    c: RGBColor,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let (x, y) = at;
    match shape % 4 {
        0 => area.draw(&Circle::new(at, 5, c.filled())),
        1 => area.draw(&TriangleMarker::new(at, 7, c.filled())),
        2 => area.draw(&Rectangle::new(
            [(x - 5, y - 5), (x + 5, y + 5)],
            c.filled(),
        )),
        _ => area.draw(&Cross::new(at, 6, c.stroke_width(3))),
    }
}

/// Tick positions (µs) on a log axis from `lo` to `hi`: 1, 2, 5 × 10^k over wide ranges,
/// finer steps where the data spans less than a decade or two, so labels fall where it lies.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mantissas: &[f64] = if hi / lo > 30.0 {
        &[1.0, 2.0, 5.0]
    } else if hi / lo > 6.0 {
        &[1.0, 1.5, 2.0, 3.0, 5.0, 7.0]
    } else {
        &[1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    };
    let mut out = Vec::new();
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        for m in mantissas {
            let v = m * decade;
            if v >= lo && v <= hi {
                out.push(v);
            }
        }
        decade *= 10.0;
    }
    out
}

/// µs as milliseconds, without trailing zeros ("0.3 ms", "1.25 ms", "20 ms").
fn ms_label(us: f64) -> String {
    let s = format!("{:.3}", us / 1000.0);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s} ms")
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

fn cdf_png(path: &Path, title: &str, series: &[Series], markers: bool) -> PlotResult {
    let series: Vec<&Series> = series.iter().filter(|s| !s.ns.is_empty()).collect();
    if series.is_empty() {
        return Err("no samples".into());
    }
    let text = font();
    // The axis spans the data. QEMU reports downtime in whole ms: its 0 means "< 1 ms", drawn
    // at the left edge, which then lies below 1 ms (and the legend says so).
    let all = series.iter().flat_map(|s| s.ns.iter().copied());
    let zeros = all.clone().any(|v| v == 0);
    let mut lo = all.clone().filter(|&v| v > 0).min().unwrap_or(1_000) as f64 / 1e3 / 1.15;
    if zeros {
        // Room for the "< 1 ms" edge left of every measured value.
        lo = lo.min(1000.0 / 1.15) / 1.6;
    }
    let hi = (all.max().unwrap_or(1) as f64 / 1e3 * 1.15).max(lo * 1.5);
    // As many legend columns as the longest name allows.
    let longest = series
        .iter()
        .map(|s| s.name.chars().count())
        .max()
        .unwrap_or(10)
        + 32;
    let cols = (1060 / (longest * 8 + 50)).clamp(1, 3);
    let legend_h = if text {
        legend_height(series.len() + usize::from(zeros), cols)
    } else {
        0
    };
    let root = BitMapBackend::new(path, (1100, 600 + legend_h)).into_drawing_area();
    let e = |e: &dyn std::fmt::Display| e.to_string();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let (top, bottom) = root.split_vertically(600);
    let mut b = ChartBuilder::on(&top);
    b.margin(18);
    if text {
        b.caption(title, (FONT, 22))
            .x_label_area_size(48)
            .y_label_area_size(62);
    }
    let mut tick_points = ticks(lo, hi);
    if zeros {
        // The left edge is where QEMU's "0 ms" (< 1 ms) sits: label it so, alone.
        tick_points.retain(|&v| v > lo * 1.5);
        tick_points.insert(0, lo);
    }
    let mut chart = b
        .build_cartesian_2d(
            (lo..hi).log_scale().with_key_points(tick_points),
            0f64..1.02,
        )
        .map_err(|x| e(&x))?;
    let x_fmt = |v: &f64| {
        if zeros && (*v - lo).abs() < 1e-9 {
            "< 1 ms".to_string()
        } else {
            ms_label(*v)
        }
    };
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("blackout (log scale)")
            .y_desc("fraction of migrations ≤ x")
            .label_style((FONT, 15))
            .x_label_formatter(&x_fmt);
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|x| e(&x))?;
    let mut entries = Vec::new();
    for (k, s) in series.iter().enumerate() {
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
        if s.dashed {
            chart
                .draw_series(DashedLineSeries::new(pts, 8, 5, style))
                .map_err(|x| e(&x))?;
        } else {
            chart
                .draw_series(LineSeries::new(pts, style))
                .map_err(|x| e(&x))?;
        }
        let marker = markers.then_some(k);
        if let Some(marker) = marker {
            // The median of each series gets its marker shape.
            let med = (v[v.len() / 2] as f64 / 1e3).max(lo);
            let at = chart.backend_coord(&(med, 0.5));
            draw_marker(&top, at, marker, s.color).map_err(|x| e(&x))?;
        }
        let zero_note = if v.first() == Some(&0) {
            " (0 ms reported: < 1 ms)"
        } else {
            ""
        };
        entries.push(Entry {
            name: format!("{} (n={}){zero_note}", s.name, v.len()),
            color: s.color,
            swatch: Swatch::Line {
                dashed: s.dashed,
                marker,
            },
        });
    }
    if text {
        if zeros {
            entries.push(Entry {
                name: "QEMU reports whole ms: its 0 ms is < 1 ms, drawn at the left edge".into(),
                color: WHITE,
                swatch: Swatch::Box,
            });
        }
        draw_legend(&bottom, &entries, cols)?;
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

/// One colour per phase, "other" a dark grey that shows on white.
const PHASE_COLORS: [RGBColor; 7] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x17, 0xbe, 0xcf),
    RGBColor(0x55, 0x55, 0x55),
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
        * 1.05;
    let cols = 4;
    let legend_h = if text {
        legend_height(PHASES.len(), cols)
    } else {
        0
    };
    let width = (1000).max(120 + 90 * cells.len() as u32);
    let root = BitMapBackend::new(path, (width, 620 + legend_h)).into_drawing_area();
    let e = |e: &dyn std::fmt::Display| e.to_string();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let (top, bottom) = root.split_vertically(620);
    let n = cells.len() as u32;
    let mut b = ChartBuilder::on(&top);
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
    let mut entries = Vec::new();
    for (k, (_, label)) in PHASES.iter().enumerate() {
        let color = PHASE_COLORS[k % PHASE_COLORS.len()];
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
        chart.draw_series(rects).map_err(|x| e(&x))?;
        entries.push(Entry {
            name: (*label).to_string(),
            color,
            swatch: Swatch::Box,
        });
    }
    if text {
        draw_legend(&bottom, &entries, cols)?;
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
                    // Whole ms: below 1 ms QEMU says 0 ("< 1 ms", drawn at the left edge).
                    ns: column(c, "downtime_ns")
                        .into_iter()
                        .map(|v| if v < 1_000_000 { 0 } else { v })
                        .collect(),
                    color,
                    dashed: true,
                });
            }
            let p = out.join(format!("blackout-cdf-{mem}M.png"));
            let title = format!(
                "Blackout CDF, {mem} MiB, 1 vCPU, dirty 16 MiB at max rate: blip vs QEMU (same run)"
            );
            let r = cdf_png(&p, &title, &series, false);
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
            "{}M {}v {}{}{}{}",
            c["mem_mib"],
            c["vcpus"],
            c["workload"].as_str().unwrap_or("?"),
            if c["platform"] == "pc" { " pc" } else { "" },
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
                color: PALETTE[i % PALETTE.len()],
                // The second platform dashed (colours repeat only past 12 cells).
                dashed: c["platform"] == "pc" || i >= PALETTE.len(),
            })
            .collect();
        let p = out.join("blackout-cdf-matrix.png");
        let r = cdf_png(
            &p,
            "blip VMM blackout CDF, migrate matrix (dashed: pc platform)",
            &series,
            true,
        );
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
