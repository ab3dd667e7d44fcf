//! The bench's D = 0 floor: the same probes against a replica streaming through the delay
//! link at 0 ms and against one streaming straight from the primary, in one lab on the same
//! storage, so that the link's own share of the floor (the stale share and the
//! commit-to-visible time an immediate read after COMMIT sees at D = 0) is a number.

use std::{fmt::Write as _, time::Duration};

use lagprobe::{
    ProbeOptions, ProbeResult, Result, Verdict,
    service::Service,
    settings::{LabSettings, PoolSettings, StrategyDefaults},
};

use super::{BenchOptions, lab_app, lab_of};

/// Probe rounds per replica, alternating between them so that drift hits both alike.
const ROUNDS: u32 = 20;

/// The floor table, from `options.rate_probes` probes (at least 200) on each replica.
pub async fn floor(options: &BenchOptions) -> Result<String> {
    let lab = LabSettings {
        replicas: 2,
        direct_replica: true,
        ..LabSettings::default()
    };
    let app = lab_app(options, 0, lab).await?;
    let lab = lab_of(&app);
    // replica1 crosses the link; replica2, the last, is the direct one.
    let services = lab
        .replica_urls()
        .into_iter()
        .map(|(_, url)| {
            Service::connect(
                &lab.primary_url(),
                &[url],
                &PoolSettings::default(),
                StrategyDefaults::default(),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let probe_options = ProbeOptions {
        poll_interval: Duration::from_millis(1),
        ..ProbeOptions::default()
    };
    let per_round = options.rate_probes.max(200).div_ceil(ROUNDS);
    let mut results: [Vec<ProbeResult>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..ROUNDS {
        for (slot, service) in services.iter().enumerate() {
            for _ in 0..per_round {
                results[slot].push(service.engine().probe(&probe_options).await?);
            }
        }
    }
    app.shutdown().await;
    let mut table = floor_table(&results, per_round * ROUNDS);
    table.push_str(&round_differences(&results, per_round as usize));
    Ok(table)
}

/// The link's share at p50 round by round (each round's linked p50 minus its direct p50,
/// taken minutes apart at most, so slow drift in the machine's load cancels): median and
/// range over the rounds, beside the single figure from all probes.
fn round_differences(results: &[Vec<ProbeResult>; 2], per_round: usize) -> String {
    let p50_of = |probes: &[ProbeResult]| {
        let mut visible: Vec<Duration> = probes.iter().filter_map(|p| p.visible_after).collect();
        visible.sort();
        quantile_ms(&visible, 0.5)
    };
    let mut differences: Vec<f64> = results[0]
        .chunks(per_round)
        .zip(results[1].chunks(per_round))
        .map(|(linked, direct)| p50_of(linked) - p50_of(direct))
        .collect();
    differences.sort_by(f64::total_cmp);
    let Some((first, last)) = differences.first().zip(differences.last()) else {
        return String::new();
    };
    format!(
        "Round by round ({} rounds): median {:+.2} ms, from {first:+.2} to {last:+.2} ms.\n\n",
        differences.len(),
        differences[differences.len() / 2]
    )
}

/// Stale share and commit-to-visible p50 / p99 each way, and the link's share at p50.
fn floor_table(results: &[Vec<ProbeResult>; 2], probes: u32) -> String {
    let mut table = format!(
        "## The D = 0 floor: through the link at 0 ms vs straight from the primary \
         ({probes} probes each, alternating, 1 ms polls)\n\n\
         | replica | stale share | commit-to-visible p50 ms | p99 ms |\n|---|---:|---:|---:|\n"
    );
    let mut p50 = [0.0; 2];
    for (slot, label) in ["through the link at 0 ms", "straight from the primary"]
        .into_iter()
        .enumerate()
    {
        let probes = &results[slot];
        let stale = probes
            .iter()
            .filter(|probe| probe.verdict == Verdict::Stale)
            .count();
        let mut visible: Vec<Duration> = probes
            .iter()
            .filter_map(|probe| probe.visible_after)
            .collect();
        visible.sort();
        p50[slot] = quantile_ms(&visible, 0.5);
        let _ = writeln!(
            table,
            "| {label} | {:.1}% | {:.2} | {:.2} |",
            100.0 * stale as f64 / probes.len().max(1) as f64,
            p50[slot],
            quantile_ms(&visible, 0.99)
        );
    }
    let _ = writeln!(
        table,
        "\nThe link's share of the floor at p50: {:+.2} ms (target <= 0.2 ms).",
        p50[0] - p50[1]
    );
    table
}

/// The `q` quantile of sorted samples, in ms (0 for none).
fn quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}
