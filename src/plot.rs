//! `metrics.png`: one small panel per metric vs step, train and eval lines, drawn from a run's
//! `metrics.jsonl`. Text is rendered with an embedded font (a 10 kB ASCII subset of DejaVu
//! Sans, `assets/fonts`), so no fontconfig or system fonts are needed.
//!
//! Tolerant reading: lines that are not JSON objects are skipped; a metric is *eval* when its
//! key starts with `eval_` or `eval/` (TRL's naming) or its line has `"eval": true`; `null`
//! and non-finite values are skipped; a series with no points at all gets no panel.

use crate::bail;
use crate::error::{Context, Error, Result};
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans-ascii.ttf");
const FAMILY: &str = "sans-serif";
static REGISTER: Once = Once::new();

const PANEL_W: u32 = 420;
const PANEL_H: u32 = 280;

/// One panel's data.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Panel {
    pub name: String,
    pub train: Vec<(f64, f64)>,
    pub eval: Vec<(f64, f64)>,
}

/// The base name of a metric key and whether it is an eval key.
fn split_key(key: &str) -> (&str, bool) {
    for p in ["eval_", "eval/"] {
        if let Some(rest) = key.strip_prefix(p) {
            return (rest, true);
        }
    }
    (key, false)
}

const NOT_SERIES: [&str; 4] = ["step", "eval", "epoch", "timestamp"];

/// Reads metrics.jsonl into panels for `series` (base names or `eval_`-prefixed names, which
/// share the base name's panel); with an empty `series`, every numeric metric gets a panel.
pub fn read_panels(metrics_jsonl: &Path, series: &[&str]) -> Result<Vec<Panel>> {
    let text = std::fs::read_to_string(metrics_jsonl)
        .with_context(|| format!("reading {}", metrics_jsonl.display()))?;
    let mut panels: Vec<Panel> = Vec::new();
    let fixed = !series.is_empty();
    for s in series {
        let (base, _) = split_key(s);
        if !panels.iter().any(|p| p.name == base) {
            panels.push(Panel {
                name: base.to_string(),
                ..Default::default()
            });
        }
    }
    for (i, line) in text.lines().enumerate() {
        let Ok(serde_json::Value::Object(obj)) = serde_json::from_str::<serde_json::Value>(line)
        else {
            continue;
        };
        let step = obj.get("step").and_then(|s| s.as_f64()).unwrap_or(i as f64);
        let line_eval = obj.get("eval").and_then(|e| e.as_bool()).unwrap_or(false);
        for (k, v) in &obj {
            if NOT_SERIES.contains(&k.as_str()) {
                continue;
            }
            let Some(v) = v.as_f64().filter(|v| v.is_finite()) else {
                continue;
            };
            let (base, key_eval) = split_key(k);
            let idx = match panels.iter().position(|p| p.name == base) {
                Some(i) => i,
                None if !fixed => {
                    panels.push(Panel {
                        name: base.to_string(),
                        ..Default::default()
                    });
                    panels.len() - 1
                }
                None => continue,
            };
            let p = &mut panels[idx];
            if key_eval || line_eval {
                p.eval.push((step, v));
            } else {
                p.train.push((step, v));
            }
        }
    }
    panels.retain(|p| !p.train.is_empty() || !p.eval.is_empty());
    for p in &mut panels {
        p.train.sort_by(|a, b| a.0.total_cmp(&b.0));
        p.eval.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    Ok(panels)
}

/// Centred moving average over `2 * half + 1` points (shrinking at the ends), so the smoothed
/// curve does not lag the raw one.
fn smooth(points: &[(f64, f64)], half: usize) -> Vec<(f64, f64)> {
    let n = points.len();
    let mut prefix = vec![0.0; n + 1];
    for (i, p) in points.iter().enumerate() {
        prefix[i + 1] = prefix[i] + p.1;
    }
    (0..n)
        .map(|i| {
            let h = half.min(i).min(n - 1 - i);
            let (a, b) = (i - h, i + h + 1);
            (points[i].0, (prefix[b] - prefix[a]) / (b - a) as f64)
        })
        .collect()
}

/// Draws one panel per series of `metrics_jsonl` into `out_png` (see the module docs).
/// Errors when the file cannot be read or no requested series has a point.
pub fn plot_metrics(metrics_jsonl: &Path, out_png: &Path, series: &[&str]) -> Result<()> {
    let panels = read_panels(metrics_jsonl, series)?;
    if panels.is_empty() {
        bail!(
            "{}: none of the series {:?} has a finite value",
            metrics_jsonl.display(),
            series
        );
    }
    draw(&panels, out_png).with_context(|| format!("drawing {}", out_png.display()))
}

fn draw(panels: &[Panel], out_png: &Path) -> Result<()> {
    REGISTER.call_once(|| {
        let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT);
    });
    let n = panels.len();
    let cols = match n {
        1 => 1,
        2..=4 => 2,
        _ => 3,
    };
    let rows = n.div_ceil(cols);
    let (w, h) = (PANEL_W * cols as u32, PANEL_H * rows as u32);
    let root = BitMapBackend::new(out_png, (w, h)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| Error::Msg(format!("{e}")))?;
    let areas = root.split_evenly((rows, cols));
    let train_c = RGBColor(31, 119, 180);
    let train_light = RGBColor(174, 199, 232);
    let eval_c = RGBColor(214, 39, 40);
    for (panel, area) in panels.iter().zip(areas.iter()) {
        draw_panel(panel, area, train_c, train_light, eval_c)
            .map_err(|e| Error::Msg(format!("panel {}: {e}", panel.name)))?;
    }
    root.present().map_err(|e| Error::Msg(format!("{e}")))?;
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(
    p: &Panel,
    area: &DrawingArea<DB, plotters::coord::Shift>,
    train_c: RGBColor,
    train_light: RGBColor,
    eval_c: RGBColor,
) -> std::result::Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    let all = p.train.iter().chain(p.eval.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x1 <= x0 {
        x0 -= 1.0;
        x1 += 1.0;
    }
    let pad = if y1 > y0 {
        (y1 - y0) * 0.08
    } else {
        y0.abs().max(1e-3) * 0.1
    };
    let (y0, y1) = (y0 - pad, y1 + pad);
    let last = |v: &[(f64, f64)]| v.last().map(|l| l.1);
    let mut title = p.name.clone();
    if let Some(t) = last(&p.train) {
        title.push_str(&format!("  (last {})", fmt_num(t)));
    }
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FAMILY, 15))
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(52)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    chart
        .configure_mesh()
        .light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(RGBColor(215, 215, 215))
        .x_labels(5)
        .y_labels(5)
        .x_desc("step")
        .label_style((FAMILY, 11))
        .axis_desc_style((FAMILY, 11))
        .x_label_formatter(&|x| {
            if x.fract() == 0.0 && x.abs() < 1e9 {
                format!("{x:.0}")
            } else {
                fmt_num(*x)
            }
        })
        .y_label_formatter(&|y| fmt_tick(*y, y1 - y0))
        .draw()?;
    let noisy = p.train.len() > 30;
    // Legend away from where the curve ends.
    let series_for_trend = if p.train.len() >= 2 {
        &p.train
    } else {
        &p.eval
    };
    let rising = match (series_for_trend.first(), series_for_trend.last()) {
        (Some(a), Some(b)) => b.1 > a.1,
        _ => false,
    };
    if !p.train.is_empty() {
        if noisy {
            chart.draw_series(LineSeries::new(p.train.iter().copied(), train_light))?;
            let half = (p.train.len() / 40).max(2);
            chart
                .draw_series(LineSeries::new(
                    smooth(&p.train, half),
                    train_c.stroke_width(2),
                ))?
                .label("train (smoothed)")
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], train_c.stroke_width(2))
                });
        } else {
            chart
                .draw_series(
                    LineSeries::new(p.train.iter().copied(), train_c.stroke_width(2))
                        .point_size(if p.train.len() == 1 { 3 } else { 0 }),
                )?
                .label("train")
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], train_c.stroke_width(2))
                });
        }
    }
    if !p.eval.is_empty() {
        chart
            .draw_series(
                LineSeries::new(p.eval.iter().copied(), eval_c.stroke_width(2)).point_size(3),
            )?
            .label(match last(&p.eval) {
                Some(v) => format!("eval (last {})", fmt_num(v)),
                None => "eval".into(),
            })
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], eval_c.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(if rising {
            SeriesLabelPosition::LowerRight
        } else {
            SeriesLabelPosition::UpperRight
        })
        .background_style(WHITE.mix(0.8))
        .border_style(RGBColor(200, 200, 200))
        .label_font((FAMILY, 11))
        .draw()?;
    Ok(())
}

/// Short number labels: 3 significant digits, scientific when tiny or huge.
fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// An axis label: as many decimals as the spacing of about five ticks over `span` needs, so
/// that neighbouring labels differ (-106.2, -106.4 rather than -106, -106), and a value within
/// rounding noise of zero printed as 0 (not -1.1e-16).
fn fmt_tick(v: f64, span: f64) -> String {
    let step = span / 5.0;
    if !(step.is_finite() && step > 0.0) {
        return fmt_num(v);
    }
    if v.abs() < step * 1e-6 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-3..1e5).contains(&a) {
        return format!("{v:.1e}");
    }
    let dec = (-step.log10().floor()).clamp(0.0, 6.0) as usize;
    format!("{v:.dec$}")
}

/// One panel of an overlay: the same metric of several runs, one line each.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct OverlayPanel {
    pub name: String,
    pub x_label: String,
    /// `(run name, points)`, in run order (the colours follow it).
    pub lines: Vec<(String, Vec<(f64, f64)>)>,
}

/// Colours of the runs in an overlay (tab10's first six, then grey).
const RUN_COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn run_colour(i: usize) -> RGBColor {
    RUN_COLOURS
        .get(i)
        .copied()
        .unwrap_or(RGBColor(127, 127, 127))
}

/// Draws `panels` (several runs per panel) to a PNG, or an SVG when `out` ends in `.svg`.
/// Long noisy lines are smoothed as in `metrics.png`.
pub fn plot_overlay(panels: &[OverlayPanel], out: &Path) -> Result<()> {
    let panels: Vec<&OverlayPanel> = panels
        .iter()
        .filter(|p| p.lines.iter().any(|l| !l.1.is_empty()))
        .collect();
    if panels.is_empty() {
        bail!("{}: nothing to draw (no series has a point)", out.display());
    }
    REGISTER.call_once(|| {
        let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT);
    });
    let cols = match panels.len() {
        1 => 1,
        2..=4 => 2,
        _ => 3,
    };
    let rows = panels.len().div_ceil(cols);
    let size = (PANEL_W * cols as u32, PANEL_H * rows as u32);
    let svg = out.extension().and_then(|e| e.to_str()) == Some("svg");
    let result = if svg {
        draw_overlay(
            SVGBackend::new(out, size).into_drawing_area(),
            &panels,
            (rows, cols),
        )
    } else {
        draw_overlay(
            BitMapBackend::new(out, size).into_drawing_area(),
            &panels,
            (rows, cols),
        )
    };
    result.map_err(|e| Error::Msg(format!("drawing {}: {e}", out.display())))
}

fn draw_overlay<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    panels: &[&OverlayPanel],
    grid: (usize, usize),
) -> std::result::Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    for (p, area) in panels.iter().zip(root.split_evenly(grid).iter()) {
        let all = p.lines.iter().flat_map(|l| l.1.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in all {
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        }
        if x1 <= x0 {
            (x0, x1) = (x0 - 1.0, x1 + 1.0);
        }
        let pad = if y1 > y0 {
            (y1 - y0) * 0.08
        } else {
            y0.abs().max(1e-3) * 0.1
        };
        let mut chart = ChartBuilder::on(area)
            .caption(&p.name, (FAMILY, 15))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(52)
            .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))?;
        chart
            .configure_mesh()
            .light_line_style(RGBColor(235, 235, 235))
            .bold_line_style(RGBColor(215, 215, 215))
            .x_labels(5)
            .y_labels(5)
            .x_desc(p.x_label.as_str())
            .label_style((FAMILY, 11))
            .axis_desc_style((FAMILY, 11))
            .x_label_formatter(&|x| fmt_tick(*x, x1 - x0))
            .y_label_formatter(&|y| fmt_tick(*y, y1 - y0 + 2.0 * pad))
            .draw()?;
        for (i, (run, pts)) in p.lines.iter().enumerate() {
            if pts.is_empty() {
                continue;
            }
            let c = run_colour(i);
            let line = if pts.len() > 30 {
                smooth(pts, (pts.len() / 40).max(2))
            } else {
                pts.clone()
            };
            let last = pts.last().map(|l| fmt_num(l.1)).unwrap_or_default();
            chart
                .draw_series(
                    LineSeries::new(line, c.stroke_width(2)).point_size(if pts.len() <= 12 {
                        3
                    } else {
                        0
                    }),
                )?
                .label(format!("{run} (last {last})"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(RGBColor(200, 200, 200))
            .label_font((FAMILY, 11))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_labels_resolve_their_spacing() {
        // a 1-nat range around -106: labels one decimal apart, not all "-106"
        assert_eq!(fmt_tick(-106.2, 1.0), "-106.2");
        assert_eq!(fmt_tick(-106.4, 1.0), "-106.4");
        assert_eq!(fmt_tick(20.0, 30.0), "20");
        assert_eq!(fmt_tick(0.4, 1.0), "0.4");
        assert_eq!(fmt_tick(0.625, 0.03), "0.625");
        // float noise at zero, and tiny learning rates
        assert_eq!(fmt_tick(-1.1e-16, 0.8), "0");
        assert_eq!(fmt_tick(2e-5, 5e-5), "2.0e-5");
    }

    #[test]
    fn reads_train_and_eval_tolerantly() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("metrics.jsonl");
        std::fs::write(
            &m,
            concat!(
                "{\"step\":1,\"loss\":0.7,\"rewards/accuracies\":0.5}\n",
                "not json\n",
                "{\"step\":2,\"loss\":null,\"eval_loss\":0.69,\"eval/rewards/accuracies\":0.6}\n",
                "{\"step\":3,\"eval\":true,\"loss\":0.68}\n",
                "{\"step\":3,\"loss\":0.6}\n",
            ),
        )
        .unwrap();
        let p = read_panels(&m, &["loss", "rewards/accuracies", "kl"]).unwrap();
        assert_eq!(p.len(), 2, "absent kl skipped");
        assert_eq!(p[0].name, "loss");
        assert_eq!(p[0].train, vec![(1.0, 0.7), (3.0, 0.6)]);
        assert_eq!(p[0].eval, vec![(2.0, 0.69), (3.0, 0.68)]);
        assert_eq!(p[1].eval, vec![(2.0, 0.6)]);
        let all = read_panels(&m, &[]).unwrap();
        assert_eq!(all.len(), 2);
        let png = dir.path().join("metrics.png");
        plot_metrics(&m, &png, &["loss", "eval_rewards/accuracies", "kl"]).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(plot_metrics(&m, &png, &["kl"]).is_err());
        if let Ok(p) = std::env::var("ALIGN_PLOT_DEMO") {
            plot_metrics(
                Path::new(&p),
                &Path::new(&p).with_extension("png"),
                &[
                    "loss",
                    "rewards/accuracies",
                    "rewards/margins",
                    "eval_rewards/accuracies",
                    "kl",
                ],
            )
            .unwrap();
        }
        assert!(plot_metrics(&dir.path().join("none.jsonl"), &png, &["kl"]).is_err());
    }
}
