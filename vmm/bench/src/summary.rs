//! Repetitions folded into medians with min and max, the table `pvstack
//! bench` prints, and its JSON report.

use std::fmt::Write as _;

use pvstack_devices::blk::BlkMode;
use pvstack_devices::net::NetMode;
use serde::Serialize;

use super::child::Sample;
use super::workload::Workload;

/// Median, min and max of one metric over the repetitions.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// The spread of `values`; `None` if there are none.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Spread> {
        let mut sorted: Vec<f64> = values.into_iter().collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: sorted[0],
            max: sorted[n - 1],
        })
    }
}

/// Why a run reports no interrupt count: the counts come from the log
/// line each device (in the VMM, or pvstack-blk) prints at the end; a
/// backend that is not pvstack-blk prints none, and an irqfd is consumed
/// by KVM, so nothing else can count them.
const MISSING_INTERRUPTS: &str =
    "n/a: no device reported a count (only pvstack's own devices and pvstack-blk do)";

/// Why a run reports no exit count: `net-bench` does not ask the VMM for
/// its exit counters (kicks/req shows the doorbells instead).
const MISSING_EXITS: &str = "n/a: net-bench does not report VM exits";

/// One mode and workload over every repetition.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub mode: String,
    pub workload: String,
    pub iops: Spread,
    pub mbps: Spread,
    pub exits_per_req: Option<Spread>,
    /// Why `exits_per_req` is missing, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exits_note: Option<&'static str>,
    pub kicks_per_req: Spread,
    pub interrupts_per_req: Option<Spread>,
    /// Why `interrupts_per_req` is missing, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interrupts_note: Option<&'static str>,
    pub cpu_s_per_gib: Spread,
    pub samples: Vec<Sample>,
}

impl Summary {
    /// Folds the samples of `mode` (a disk or NIC mode's name) and
    /// `workload` (at least one).
    pub fn new(mode: &str, workload: Workload, samples: Vec<Sample>) -> Option<Summary> {
        let spread = |f: fn(&Sample) -> f64| Spread::of(samples.iter().map(f));
        let interrupts = Spread::of(samples.iter().filter_map(|s| s.interrupts_per_req));
        let exits = Spread::of(samples.iter().filter_map(|s| s.exits_per_req));
        Some(Summary {
            mode: mode.to_string(),
            workload: workload.name().to_string(),
            iops: spread(|s| s.iops)?,
            mbps: spread(|s| s.mbps)?,
            exits_note: exits.is_none().then_some(MISSING_EXITS),
            exits_per_req: exits,
            kicks_per_req: spread(|s| s.kicks_per_req)?,
            interrupts_note: interrupts.is_none().then_some(MISSING_INTERRUPTS),
            interrupts_per_req: interrupts,
            cpu_s_per_gib: spread(|s| s.cpu_s_per_gib)?,
            samples,
        })
    }
}

/// A ratio of median IOPS that the project's goals name.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    pub name: String,
    pub value: f64,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub repetitions: u32,
    pub duration_secs: u64,
    pub image_bytes: u64,
    /// The disk image, if any disk workload ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Bytes each `net-tcp-tx` run sends, if one ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub net_tcp_bytes: Option<u64>,
    pub results: Vec<Summary>,
    pub ratios: Vec<Ratio>,
}

impl Report {
    fn median_iops(&self, mode: BlkMode, workload: Workload) -> Option<f64> {
        self.median(mode.name(), workload, |s| s.iops.median)
    }

    fn median(&self, mode: &str, workload: Workload, metric: fn(&Summary) -> f64) -> Option<f64> {
        self.results
            .iter()
            .find(|s| s.mode == mode && s.workload == workload.name())
            .map(metric)
    }

    /// Fills `ratios` with every ratio of vhost-user's median IOPS to
    /// another mode's, per disk workload, and of pvstack-net's median rate
    /// (MB/s for TCP, frames/s for UDP) to the emulated NIC's, that the
    /// results allow.
    pub fn compute_ratios(&mut self) {
        let mut ratios = Vec::new();
        for workload in Workload::ALL.into_iter().filter(|w| !w.is_net()) {
            let Some(vhost) = self.median_iops(BlkMode::VhostUser, workload) else {
                continue;
            };
            for other in [BlkMode::EmulatedLegacy, BlkMode::EmulatedVirtio] {
                if let Some(base) = self.median_iops(other, workload).filter(|&b| b > 0.0) {
                    ratios.push(Ratio {
                        name: format!("vhost-user / {other} IOPS, {workload}"),
                        value: vhost / base,
                    });
                }
            }
        }
        for (workload, unit, metric) in [
            (
                Workload::NetTcpTx,
                "MB/s",
                (|s| s.mbps.median) as fn(&Summary) -> f64,
            ),
            (Workload::NetUdp64, "frames/s", |s| s.iops.median),
        ] {
            let (vhost, emulated) = (NetMode::VhostUser, NetMode::Emulated);
            let paravirtual = self.median(vhost.name(), workload, metric);
            let base = self.median(emulated.name(), workload, metric);
            if let (Some(pv), Some(base)) = (paravirtual, base.filter(|&b| b > 0.0)) {
                ratios.push(Ratio {
                    name: format!("{vhost} / {emulated} {unit}, {workload}"),
                    value: pv / base,
                });
            }
        }
        self.ratios = ratios;
    }

    /// The table for a terminal: one row per mode and workload, each cell
    /// `median (min-max)`.
    pub fn table(&self) -> String {
        let header = [
            "mode",
            "workload",
            "IOPS",
            "MB/s",
            "exits/req",
            "kicks/req",
            "irqs/req",
            "CPU s/GiB",
        ];
        let mut rows = vec![header.map(String::from).to_vec()];
        for s in &self.results {
            rows.push(vec![
                s.mode.clone(),
                s.workload.clone(),
                cell(&s.iops, 1),
                cell(&s.mbps, 1),
                s.exits_per_req
                    .as_ref()
                    .map_or("n/a".to_string(), |e| cell(e, 3)),
                cell(&s.kicks_per_req, 3),
                s.interrupts_per_req
                    .as_ref()
                    .map_or("n/a".to_string(), |i| cell(i, 3)),
                cell(&s.cpu_s_per_gib, 2),
            ]);
        }
        let widths: Vec<usize> = (0..header.len())
            .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for row in &rows {
            let line: Vec<String> = row
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(c, (text, &w))| {
                    if c < 2 {
                        format!("{text:<w$}")
                    } else {
                        format!("{text:>w$}")
                    }
                })
                .collect();
            let _ = writeln!(out, "{}", line.join("  ").trim_end());
        }
        if self.results.iter().any(|s| s.interrupts_per_req.is_none()) {
            let _ = writeln!(out, "irqs/req {MISSING_INTERRUPTS}.");
        }
        if self.results.iter().any(|s| s.exits_per_req.is_none()) {
            let _ = writeln!(out, "exits/req {MISSING_EXITS}.");
        }
        if self.results.iter().any(|s| s.workload.starts_with("net-")) {
            let _ = writeln!(
                out,
                "net rows: IOPS = frames from the guest per second, a request = one frame."
            );
        }
        for ratio in &self.ratios {
            let _ = writeln!(out, "{}: {:.1}x", ratio.name, ratio.value);
        }
        out
    }
}

fn cell(spread: &Spread, decimals: usize) -> String {
    format!(
        "{:.d$} ({:.d$}-{:.d$})",
        spread.median,
        spread.min,
        spread.max,
        d = decimals
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(iops: f64, irqs: Option<f64>) -> Sample {
        Sample {
            ios: 10,
            bytes: 40960,
            iops,
            mbps: iops * 4096.0 / 1e6,
            exits_per_req: Some(1.0),
            kicks_per_req: 1.0,
            interrupts_per_req: irqs,
            cpu_s_per_gib: 2.0,
        }
    }

    #[test]
    fn spread_is_median_min_max() {
        assert_eq!(Spread::of([]), None);
        let s = Spread::of([3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of([4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
    }

    #[test]
    fn report_ratios_table_and_json() {
        let w = Workload::RandRead4kQd1;
        let mut report = Report {
            repetitions: 2,
            duration_secs: 1,
            image_bytes: 1 << 20,
            image: Some("/dev/shm/x".into()),
            net_tcp_bytes: None,
            results: vec![
                Summary::new("emulated-legacy", w, vec![sample(40.0, Some(0.0))]).unwrap(),
                Summary::new("vhost-user", w, vec![sample(8000.0, None)]).unwrap(),
            ],
            ratios: vec![],
        };
        report.compute_ratios();
        assert_eq!(report.ratios.len(), 1);
        assert_eq!(report.ratios[0].value, 200.0);
        let table = report.table();
        assert!(
            table.contains("vhost-user       4k-randread-qd1"),
            "{table}"
        );
        assert!(table.contains("n/a"), "{table}");
        assert!(table.contains("200.0x"), "{table}");
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(json["results"][1]["iops"]["median"], 8000.0);
        assert!(json["results"][1]["interrupts_per_req"].is_null());
        assert!(json["results"][1]["interrupts_note"].is_string());
        assert!(json["results"][0]["interrupts_note"].is_null());
        assert!(json["results"][0]["exits_note"].is_null());
    }

    #[test]
    fn net_rows_have_their_own_ratios_and_no_exits() {
        let net = |mode: &str, workload, rate: f64| {
            let mut s = sample(rate, None);
            s.exits_per_req = None;
            Summary::new(mode, workload, vec![s]).unwrap()
        };
        let mut report = Report {
            repetitions: 1,
            duration_secs: 1,
            image_bytes: 0,
            image: None,
            net_tcp_bytes: Some(1 << 20),
            results: vec![
                net("vhost-user", Workload::NetUdp64, 300.0),
                net("emulated", Workload::NetUdp64, 100.0),
                net("vhost-user", Workload::NetTcpTx, 1000.0),
            ],
            ratios: vec![],
        };
        report.compute_ratios();
        assert_eq!(report.ratios.len(), 1, "{:?}", report.ratios);
        assert_eq!(
            report.ratios[0].name,
            "vhost-user / emulated frames/s, net-udp-64"
        );
        assert_eq!(report.ratios[0].value, 3.0);
        let table = report.table();
        assert!(table.contains("exits/req n/a"), "{table}");
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert!(json["results"][0]["exits_per_req"].is_null());
        assert!(json["results"][0]["exits_note"].is_string());
        assert!(json.get("image").is_none());
    }
}
