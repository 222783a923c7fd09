//! What the simulations on tokio's paused clock share (the retry storm, hedging and
//! adaptive limit benchmarks): calls started at a steady rate, quantiles and how their
//! figures print, the files they write, and the pieces of their hand-written SVG plots.
//!
//! The plots are written by hand rather than with a plotting crate: a few lines of SVG
//! each, no dependency, and a file that reads well in a diff.

use std::fmt::{Display, Write as _};
use std::future::Future;
use std::path::Path;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Starts `total` calls at a steady `rate` per second from `start`, call `k` (from 0)
/// at exactly `k / rate` seconds, each in its own task made by `call(k)`; returns their
/// handles, in the order of their start.
pub async fn spawn_steady<F, Fut>(
    start: Instant,
    rate: u64,
    total: u64,
    mut call: F,
) -> Vec<JoinHandle<Fut::Output>>
where
    F: FnMut(u64) -> Fut,
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    let mut calls = Vec::with_capacity(total as usize);
    for k in 0..total {
        // `rate` calls in every second.
        tokio::time::sleep_until(start + Duration::from_nanos(k * 1_000_000_000 / rate)).await;
        calls.push(tokio::spawn(call(k)));
    }
    calls
}

/// The nearest-rank `p` quantile of `sorted`: the smallest value with at least `p` of
/// them at or below it; zero for no values.
pub fn quantile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// `200 ms`, `10 s`, `10.25 s`.
pub fn show(duration: Duration) -> String {
    let ms = duration.as_secs_f64() * 1000.0;
    if ms < 999.5 {
        format!("{ms:.0} ms")
    } else {
        let secs = format!("{:.2}", ms / 1000.0);
        format!("{} s", secs.trim_end_matches('0').trim_end_matches('.'))
    }
}

/// How a goal is marked: `met` or `NOT met`.
pub fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// Runs each of `contenders` in turn, and says on stderr how each went: its `name`,
/// then the calls, upstream attempts and wall time `tally` reads from its run.
pub async fn run_each<C, R, Fut>(
    contenders: impl IntoIterator<Item = C>,
    name: impl Fn(&C) -> String,
    mut run: impl FnMut(C) -> Fut,
    tally: impl Fn(&R) -> (u64, u64, Duration),
) -> Vec<R>
where
    Fut: Future<Output = R>,
{
    let mut runs = Vec::new();
    for contender in contenders {
        eprint!("{} ", name(&contender));
        let done = run(contender).await;
        let (calls, attempts, wall) = tally(&done);
        eprintln!(
            "{calls} calls, {attempts} upstream attempts, {:.2} s",
            wall.as_secs_f64()
        );
        runs.push(done);
    }
    runs
}

/// Writes each `(name, text)` of `files` into `dir` (created if need be) and says so on
/// stdout; on an error, says which file on stderr, prefixed with `program`, and ends the
/// process with status 1.
pub fn write_files(program: &str, dir: &Path, files: &[(&str, String)]) {
    if let Err(error) = std::fs::create_dir_all(dir) {
        eprintln!("{program}: {}: {error}", dir.display());
        std::process::exit(1);
    }
    for (name, text) in files {
        let path = dir.join(name);
        match std::fs::write(&path, text) {
            Ok(()) => println!("wrote {}", path.display()),
            Err(error) => {
                eprintln!("{program}: {}: {error}", path.display());
                std::process::exit(1);
            }
        }
    }
}

/// A "nice" tick step (1, 2 or 5 times a power of ten) giving at most `max_ticks`
/// intervals up to `max`.
pub fn tick_step(max: f64, max_ticks: f64) -> f64 {
    let rough = (max / max_ticks).max(1e-9);
    let power = 10f64.powf(rough.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|&step| step >= rough)
        .unwrap_or(10.0 * power)
}

/// A `stroke-dasharray` attribute, with its leading space; none for a solid line.
pub fn dasharray(dash: &str) -> String {
    if dash.is_empty() {
        String::new()
    } else {
        format!(r#" stroke-dasharray="{dash}""#)
    }
}

/// A plot's size and margins, in pixels: the plotting area is what the margins leave,
/// with the title above it, the legend in a row between the title and the area, and
/// the axis titles below and to the left.
#[derive(Debug, Clone, Copy)]
pub struct Frame {
    pub width: f64,
    pub height: f64,
    pub left: f64,
    pub right: f64,
    pub top: f64,
    pub bottom: f64,
}

impl Frame {
    /// The width of the plotting area.
    pub fn plot_w(&self) -> f64 {
        self.width - self.left - self.right
    }

    /// The height of the plotting area.
    pub fn plot_h(&self) -> f64 {
        self.height - self.top - self.bottom
    }

    /// The opening tag, a white background, and the title centred at the top.
    pub fn open(&self, s: &mut String, title: &str) {
        let (width, height) = (self.width, self.height);
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" font-size="12">"#
        );
        let _ = writeln!(
            s,
            r##"<rect width="{width}" height="{height}" fill="#ffffff"/>"##
        );
        let _ = writeln!(
            s,
            r##"<text x="{}" y="26" text-anchor="middle" font-size="16" font-weight="bold" fill="#222">{title}</text>"##,
            width / 2.0
        );
    }

    /// A horizontal grid line across the plotting area at `py`, labelled on the left.
    pub fn grid_y(&self, s: &mut String, py: f64, label: impl Display) {
        let _ = writeln!(
            s,
            r##"<line x1="{}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#e0e0e0" stroke-width="1"/>"##,
            self.left,
            self.left + self.plot_w()
        );
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#444">{label}</text>"##,
            self.left - 8.0,
            py + 4.0
        );
    }

    /// A tick under the x axis at `px`, labelled under it.
    pub fn tick_x(&self, s: &mut String, px: f64, label: impl Display) {
        let bottom = self.top + self.plot_h();
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{bottom:.1}" x2="{px:.1}" y2="{:.1}" stroke="#444" stroke-width="1"/>"##,
            bottom + 5.0
        );
        let _ = writeln!(
            s,
            r##"<text x="{px:.1}" y="{:.1}" text-anchor="middle" fill="#444">{label}</text>"##,
            bottom + 19.0
        );
    }

    /// The left and bottom axes, and their titles.
    pub fn axes(&self, s: &mut String, x_title: &str, y_title: &str) {
        let _ = writeln!(
            s,
            r##"<path d="M{},{} V{:.1} H{:.1}" fill="none" stroke="#444" stroke-width="1"/>"##,
            self.left,
            self.top,
            self.top + self.plot_h(),
            self.left + self.plot_w()
        );
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13" fill="#222">{x_title}</text>"##,
            self.left + self.plot_w() / 2.0,
            self.height - 10.0
        );
        let _ = writeln!(
            s,
            r##"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle" font-size="13" fill="#222">{y_title}</text>"##,
            self.top + self.plot_h() / 2.0
        );
    }

    /// A data line through `points` (`x,y` pairs separated by spaces).
    pub fn polyline(&self, s: &mut String, points: &str, colour: &str, dash: &str) {
        let _ = writeln!(
            s,
            r#"<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2" stroke-linejoin="round"{}/>"#,
            dasharray(dash)
        );
    }

    /// The legend, one `(label, (colour, dash))` entry after another in a row centred
    /// over the plotting area, 22 px above it.
    pub fn legend<'a, L: AsRef<str>>(
        &self,
        s: &mut String,
        entries: impl IntoIterator<Item = (L, (&'a str, &'a str))>,
    ) {
        let entries: Vec<(L, (&str, &str))> = entries.into_iter().collect();
        // Text widths estimated at 7 px a character.
        let width_of = |label: &str| 34.0 + 7.0 * label.chars().count() as f64;
        let total: f64 = entries
            .iter()
            .map(|(label, _)| width_of(label.as_ref()))
            .sum::<f64>()
            + 24.0 * (entries.len().max(1) - 1) as f64;
        let mut lx = self.left + (self.plot_w() - total) / 2.0;
        for (label, (colour, dash)) in &entries {
            let label = label.as_ref();
            let row = self.top - 22.0;
            let _ = writeln!(
                s,
                r#"<line x1="{lx:.1}" y1="{row:.1}" x2="{:.1}" y2="{row:.1}" stroke="{colour}" stroke-width="2.5"{}/>"#,
                lx + 28.0,
                dasharray(dash)
            );
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" fill="#222">{label}</text>"##,
                lx + 34.0,
                row + 4.0
            );
            lx += width_of(label) + 24.0;
        }
    }

    /// The closing tag.
    pub fn close(&self, s: &mut String) {
        s.push_str("</svg>\n");
    }
}
