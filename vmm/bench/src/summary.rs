//! Repetitions folded into medians with min and max, the table `pvstack
//! bench` prints, and its JSON report.

use std::fmt::Write as _;

use pvstack_devices::blk::BlkMode;
use pvstack_devices::net::NetMode;
use serde::Serialize;

use super::backend::QsdConfig;
use super::child::Sample;
use super::fio::FioConfig;
use super::image::Storage;
use super::load::LoadReport;
use super::mode::DiskMode;
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
/// its exit counters (kicks/req shows the doorbells instead), and the
/// host row has no VM.
const MISSING_EXITS: &str = "n/a: net-bench does not report VM exits, and the host row has no VM";

/// Why a run reports no kicks: the host row has no VM.
const MISSING_KICKS: &str = "n/a: the host row (fio) has no VM";

/// The modes the disk rows are compared with: the host's ceiling and
/// QEMU's backend.
const HOST: &str = "host";
const QSD: &str = "qsd";

/// One mode and workload over every repetition.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub mode: String,
    pub workload: String,
    /// Whether the image I/O of a disk row bypassed the host's page cache
    /// (O_DIRECT); absent for network rows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct: Option<bool>,
    pub iops: Spread,
    pub mbps: Spread,
    pub exits_per_req: Option<Spread>,
    /// Why `exits_per_req` is missing, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exits_note: Option<&'static str>,
    pub kicks_per_req: Option<Spread>,
    /// Why `kicks_per_req` is missing, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kicks_note: Option<&'static str>,
    pub interrupts_per_req: Option<Spread>,
    /// Why `interrupts_per_req` is missing, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interrupts_note: Option<&'static str>,
    pub cpu_s_per_gib: Spread,
    pub samples: Vec<Sample>,
}

impl Summary {
    /// Folds the samples of `mode` (a disk or NIC mode's name) and
    /// `workload` (at least one); `direct` for a disk row.
    pub fn new(
        mode: &str,
        workload: Workload,
        direct: Option<bool>,
        samples: Vec<Sample>,
    ) -> Option<Summary> {
        let spread = |f: fn(&Sample) -> f64| Spread::of(samples.iter().map(f));
        let interrupts = Spread::of(samples.iter().filter_map(|s| s.interrupts_per_req));
        let exits = Spread::of(samples.iter().filter_map(|s| s.exits_per_req));
        let kicks = Spread::of(samples.iter().filter_map(|s| s.kicks_per_req));
        Some(Summary {
            mode: mode.to_string(),
            workload: workload.name().to_string(),
            direct,
            iops: spread(|s| s.iops)?,
            mbps: spread(|s| s.mbps)?,
            exits_note: exits.is_none().then_some(MISSING_EXITS),
            exits_per_req: exits,
            kicks_note: kicks.is_none().then_some(MISSING_KICKS),
            kicks_per_req: kicks,
            interrupts_note: interrupts.is_none().then_some(MISSING_INTERRUPTS),
            interrupts_per_req: interrupts,
            cpu_s_per_gib: spread(|s| s.cpu_s_per_gib)?,
            samples,
        })
    }
}

/// One row of the results, named by its mode and workload.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RowRef {
    pub mode: String,
    pub workload: String,
}

/// A ratio of two rows' medians: `numerator` / `denominator` of `metric`.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    pub name: String,
    pub value: f64,
    /// `iops` or `mbps`: which median is divided.
    pub metric: &'static str,
    pub numerator: RowRef,
    pub denominator: RowRef,
}

/// The runs of one workload in one repetition, in the order they ran.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunGroup {
    pub rep: u32,
    pub workload: String,
    pub modes: Vec<String>,
}

/// A mode and workload that was not run, and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Skipped {
    pub mode: String,
    pub workload: String,
    pub reason: String,
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
    /// What holds it and whether the backends bypassed the page cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage: Option<Storage>,
    /// qemu-storage-daemon's configuration, if `qsd` ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qsd: Option<QsdConfig>,
    /// fio's configuration, if `host` ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fio: Option<FioConfig>,
    /// The spinning host threads of `--background-load`.
    pub background_load: LoadReport,
    /// Bytes each `net-tcp-tx` run sends, if one ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub net_tcp_bytes: Option<u64>,
    /// Every run in the order it ran: modes alternate direction from one
    /// repetition to the next, so drift favours none of them.
    pub run_order: Vec<RunGroup>,
    pub skipped: Vec<Skipped>,
    pub results: Vec<Summary>,
    pub ratios: Vec<Ratio>,
}

impl Report {
    fn row(&self, mode: &str, workload: &str) -> Option<&Summary> {
        self.results
            .iter()
            .find(|s| s.mode == mode && s.workload == workload)
    }

    /// Adds `numerator / denominator` of `metric` if both rows exist and
    /// the denominator is above 0.
    fn push_ratio(
        &self,
        ratios: &mut Vec<Ratio>,
        name: String,
        metric: &'static str,
        numerator: (&str, Workload),
        denominator: (&str, Workload),
    ) {
        let median = |s: &Summary| match metric {
            "mbps" => s.mbps.median,
            _ => s.iops.median,
        };
        let (Some(top), Some(bottom)) = (
            self.row(numerator.0, numerator.1.name()),
            self.row(denominator.0, denominator.1.name()),
        ) else {
            return;
        };
        if median(bottom) > 0.0 {
            ratios.push(Ratio {
                name,
                value: median(top) / median(bottom),
                metric,
                numerator: RowRef {
                    mode: numerator.0.to_string(),
                    workload: numerator.1.name().to_string(),
                },
                denominator: RowRef {
                    mode: denominator.0.to_string(),
                    workload: denominator.1.name().to_string(),
                },
            });
        }
    }

    /// Fills `ratios` with every ratio of median IOPS the results allow:
    /// each disk row to the host row and to qsd of its workload,
    /// vhost-user to the emulated modes and to itself unconfined (the
    /// sandbox's cost), two queues to one at QD32 per
    /// mode; and pvstack-net's median rate (MB/s for TCP, frames/s for
    /// UDP) to the emulated NIC's.
    pub fn compute_ratios(&mut self) {
        let mut ratios = Vec::new();
        let mut modes: Vec<String> = Vec::new();
        for s in &self.results {
            if !modes.contains(&s.mode) {
                modes.push(s.mode.clone());
            }
        }
        for workload in Workload::ALL.into_iter().filter(|w| !w.is_net()) {
            for baseline in [HOST, QSD] {
                for mode in modes.iter().filter(|&m| m != baseline && m != HOST) {
                    self.push_ratio(
                        &mut ratios,
                        format!("{mode} / {baseline} IOPS, {workload}"),
                        "iops",
                        (mode, workload),
                        (baseline, workload),
                    );
                }
            }
            // Below 1: what the sandbox costs.
            let unconfined = DiskMode::Unconfined.name();
            self.push_ratio(
                &mut ratios,
                format!("vhost-user / {unconfined} IOPS, {workload}"),
                "iops",
                (BlkMode::VhostUser.name(), workload),
                (unconfined, workload),
            );
            for other in [BlkMode::EmulatedLegacy, BlkMode::EmulatedVirtio] {
                self.push_ratio(
                    &mut ratios,
                    format!("vhost-user / {other} IOPS, {workload}"),
                    "iops",
                    (BlkMode::VhostUser.name(), workload),
                    (other.name(), workload),
                );
            }
        }
        for mode in &modes {
            self.push_ratio(
                &mut ratios,
                format!("{mode} 2 queues / 1 queue IOPS, 4K randread QD32"),
                "iops",
                (mode, Workload::RandRead4kQd32Queues2),
                (mode, Workload::RandRead4kQd32),
            );
        }
        let (vhost, emulated) = (NetMode::VhostUser.name(), NetMode::Emulated.name());
        for (workload, unit, metric) in [
            (Workload::NetTcpTx, "MB/s", "mbps"),
            (Workload::NetUdp64, "frames/s", "iops"),
        ] {
            self.push_ratio(
                &mut ratios,
                format!("{vhost} / {emulated} {unit}, {workload}"),
                metric,
                (vhost, workload),
                (emulated, workload),
            );
        }
        self.ratios = ratios;
    }

    /// The ratio of `row` to `baseline`'s row of the same workload.
    fn ratio_to(&self, row: &Summary, baseline: &str) -> Option<f64> {
        self.ratios
            .iter()
            .find(|r| {
                r.numerator.mode == row.mode
                    && r.numerator.workload == row.workload
                    && r.denominator.mode == baseline
                    && r.denominator.workload == row.workload
            })
            .map(|r| r.value)
    }

    /// The table for a terminal: one row per mode and workload, each cell
    /// `median (min-max)`, with the ratios to the host and qsd rows as
    /// columns (when those ran) and the other ratios below.
    pub fn table(&self) -> String {
        let baselines: Vec<&str> = [HOST, QSD]
            .into_iter()
            .filter(|b| self.results.iter().any(|s| s.mode == *b))
            .collect();
        let mut header: Vec<String> = [
            "mode",
            "workload",
            "IOPS",
            "MB/s",
            "exits/req",
            "kicks/req",
            "irqs/req",
            "CPU s/GiB",
        ]
        .map(String::from)
        .to_vec();
        header.extend(baselines.iter().map(|b| format!("vs {b}")));
        let mut rows = vec![header];
        let optional = |spread: &Option<Spread>, decimals| {
            spread
                .as_ref()
                .map_or("n/a".to_string(), |s| cell(s, decimals))
        };
        for s in &self.results {
            let mut row = vec![
                s.mode.clone(),
                s.workload.clone(),
                cell(&s.iops, 1),
                cell(&s.mbps, 1),
                optional(&s.exits_per_req, 3),
                optional(&s.kicks_per_req, 3),
                optional(&s.interrupts_per_req, 3),
                cell(&s.cpu_s_per_gib, 2),
            ];
            for baseline in &baselines {
                row.push(
                    self.ratio_to(s, baseline)
                        .map_or("-".to_string(), |r| format!("{r:.2}x")),
                );
            }
            rows.push(row);
        }
        let widths: Vec<usize> = (0..rows[0].len())
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
        if let Some(storage) = &self.storage {
            let io = if storage.direct {
                "O_DIRECT for pvstack-blk, qsd and fio; the VMM's emulated disks use the page cache"
            } else {
                "no O_DIRECT (memory, or a file system that refuses it)"
            };
            let _ = writeln!(
                out,
                "image: {} MiB in {} ({}), {io}.",
                self.image_bytes >> 20,
                storage.dir.display(),
                storage.kind.name(),
            );
        }
        if self.background_load.threads > 0 {
            let _ = writeln!(
                out,
                "background load: {} spinning host thread(s) during every run.",
                self.background_load.threads
            );
        }
        for skipped in &self.skipped {
            let _ = writeln!(
                out,
                "not run: {} {} ({}).",
                skipped.mode, skipped.workload, skipped.reason
            );
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
        if !baselines.is_empty() {
            let _ = writeln!(
                out,
                "vs host, vs qsd: median IOPS over that row's median IOPS for the workload."
            );
        }
        // The ratios to host and qsd are the columns above; the rest here.
        let in_columns = |r: &&Ratio| {
            baselines.contains(&r.denominator.mode.as_str())
                && r.numerator.mode != r.denominator.mode
                && r.numerator.workload == r.denominator.workload
        };
        for ratio in self.ratios.iter().filter(|r| !in_columns(r)) {
            let _ = writeln!(out, "{}: {:.2}x", ratio.name, ratio.value);
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
    use crate::image::StorageKind;

    fn sample(iops: f64, irqs: Option<f64>) -> Sample {
        Sample {
            ios: 10,
            bytes: 40960,
            iops,
            mbps: iops * 4096.0 / 1e6,
            exits_per_req: Some(1.0),
            kicks_per_req: Some(1.0),
            interrupts_per_req: irqs,
            cpu_s_per_gib: 2.0,
        }
    }

    fn report(results: Vec<Summary>) -> Report {
        Report {
            repetitions: 2,
            duration_secs: 1,
            image_bytes: 1 << 20,
            image: Some("/dev/shm/x".into()),
            storage: None,
            qsd: None,
            fio: None,
            background_load: LoadReport {
                threads: 0,
                cpu_seconds: 0.0,
                wall_seconds: 0.0,
                threads_left_after_stop: 0,
            },
            net_tcp_bytes: None,
            run_order: vec![],
            skipped: vec![],
            results,
            ratios: vec![],
        }
    }

    #[test]
    fn spread_is_median_min_max() {
        assert_eq!(Spread::of([]), None);
        let s = Spread::of([3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of([4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
    }

    /// `report` has one ratio, `name`, of `value`.
    fn assert_only_ratio(report: &Report, name: &str, value: f64) {
        assert_eq!(report.ratios.len(), 1, "{:#?}", report.ratios);
        assert_eq!(report.ratios[0].name, name);
        assert_eq!(report.ratios[0].value, value);
    }

    #[test]
    fn the_sandbox_cost_is_vhost_user_over_unconfined() {
        let w = Workload::RandRead4kQd1;
        let row = |mode, iops| Summary::new(mode, w, Some(false), vec![sample(iops, None)]);
        let mut report = report(vec![
            row("vhost-user", 9600.0).unwrap(),
            row("vhost-user-unconfined", 10000.0).unwrap(),
        ]);
        report.compute_ratios();
        assert_only_ratio(
            &report,
            "vhost-user / vhost-user-unconfined IOPS, 4k-randread-qd1",
            0.96,
        );
        let table = report.table();
        assert!(
            table.contains("vhost-user / vhost-user-unconfined IOPS, 4k-randread-qd1: 0.96x"),
            "{table}"
        );
    }

    #[test]
    fn report_ratios_table_and_json() {
        let w = Workload::RandRead4kQd1;
        let mut report = report(vec![
            Summary::new(
                "emulated-legacy",
                w,
                Some(false),
                vec![sample(40.0, Some(0.0))],
            )
            .unwrap(),
            Summary::new("vhost-user", w, Some(false), vec![sample(8000.0, None)]).unwrap(),
        ]);
        report.compute_ratios();
        assert_eq!(report.ratios.len(), 1);
        assert_eq!(report.ratios[0].value, 200.0);
        assert_eq!(report.ratios[0].numerator.mode, "vhost-user");
        assert_eq!(report.ratios[0].denominator.mode, "emulated-legacy");
        let table = report.table();
        assert!(
            table.contains("vhost-user       4k-randread-qd1"),
            "{table}"
        );
        assert!(table.contains("n/a"), "{table}");
        assert!(table.contains("200.00x"), "{table}");
        assert!(!table.contains("vs host"), "{table}");
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(json["results"][1]["iops"]["median"], 8000.0);
        assert!(json["results"][1]["interrupts_per_req"].is_null());
        assert!(json["results"][1]["interrupts_note"].is_string());
        assert!(json["results"][0]["interrupts_note"].is_null());
        assert!(json["results"][0]["exits_note"].is_null());
        assert_eq!(json["results"][0]["direct"], false);
    }

    #[test]
    fn every_row_is_compared_with_host_and_qsd() {
        let host_sample = |iops| Sample {
            exits_per_req: None,
            kicks_per_req: None,
            ..sample(iops, None)
        };
        let mut results = Vec::new();
        for w in [Workload::RandRead4kQd32, Workload::RandRead4kQd32Queues2] {
            let scale = if w == Workload::RandRead4kQd32 {
                1.0
            } else {
                1.5
            };
            results.push(
                Summary::new(
                    "vhost-user",
                    w,
                    Some(true),
                    vec![sample(400.0 * scale, None)],
                )
                .unwrap(),
            );
            results.push(
                Summary::new("qsd", w, Some(true), vec![sample(200.0 * scale, None)]).unwrap(),
            );
            results.push(
                Summary::new("host", w, Some(true), vec![host_sample(1000.0 * scale)]).unwrap(),
            );
        }
        let mut report = report(results);
        report.storage = Some(Storage {
            dir: "/var/tmp".into(),
            kind: StorageKind::Disk,
            direct: true,
        });
        report.compute_ratios();
        let value = |name: &str| {
            report
                .ratios
                .iter()
                .find(|r| r.name == name)
                .unwrap_or_else(|| panic!("no {name}: {:#?}", report.ratios))
                .value
        };
        assert_eq!(value("vhost-user / host IOPS, 4k-randread-qd32"), 0.4);
        assert_eq!(value("qsd / host IOPS, 4k-randread-qd32"), 0.2);
        assert_eq!(value("vhost-user / qsd IOPS, 4k-randread-qd32"), 2.0);
        assert_eq!(
            value("vhost-user 2 queues / 1 queue IOPS, 4K randread QD32"),
            1.5
        );
        assert_eq!(value("host 2 queues / 1 queue IOPS, 4K randread QD32"), 1.5);
        assert!(report
            .ratios
            .iter()
            .all(|r| r.name != "host / qsd IOPS, 4k-randread-qd32"));
        // 2 workloads x (vhost-user, qsd to host; vhost-user to qsd) + 3 scalings.
        assert_eq!(report.ratios.len(), 9, "{:#?}", report.ratios);
        let table = report.table();
        assert!(
            table.contains("vs host") && table.contains("vs qsd"),
            "{table}"
        );
        assert!(
            table.contains("0.40x") && table.contains("2.00x"),
            "{table}"
        );
        assert!(table.contains("in /var/tmp (disk), O_DIRECT"), "{table}");
        assert!(!table.contains("vhost-user / host"), "{table}");
        for mode in ["vhost-user", "qsd", "host"] {
            let line = format!("{mode} 2 queues / 1 queue IOPS, 4K randread QD32: 1.50x");
            assert!(table.contains(&line), "{line}: {table}");
        }
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert!(json["results"][2]["kicks_per_req"].is_null());
        assert!(json["results"][2]["kicks_note"].is_string());
        assert_eq!(json["storage"]["kind"], "disk");
    }

    #[test]
    fn net_rows_have_their_own_ratios_and_no_exits() {
        let net = |mode: &str, workload, rate: f64| {
            let mut s = sample(rate, None);
            s.exits_per_req = None;
            Summary::new(mode, workload, None, vec![s]).unwrap()
        };
        let mut report = report(vec![
            net("vhost-user", Workload::NetUdp64, 300.0),
            net("emulated", Workload::NetUdp64, 100.0),
            net("vhost-user", Workload::NetTcpTx, 1000.0),
        ]);
        report.image = None;
        report.net_tcp_bytes = Some(1 << 20);
        report.compute_ratios();
        assert_only_ratio(&report, "vhost-user / emulated frames/s, net-udp-64", 3.0);
        let table = report.table();
        assert!(table.contains("exits/req n/a"), "{table}");
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert!(json["results"][0]["exits_per_req"].is_null());
        assert!(json["results"][0]["exits_note"].is_string());
        assert!(json["results"][0].get("direct").is_none());
        assert!(json.get("image").is_none());
    }
}
