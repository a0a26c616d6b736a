//! `/metrics`: the node's view in the Prometheus text format
//! (`prometheus-client`), named like the DRBD exporter's series. Built from
//! the same `status` answer the console and `vmctl status --json` show, plus
//! the per-module counters of the daemon; every per-module series carries
//! `module` and `node` (the node the value is about: this one, or the peer
//! as its heartbeats describe it). Each series is documented in the README
//! ("Metrics"). What only vmha-fs knows (replicated bytes, latencies, the
//! activity log) comes from the running writer's `metrics.json`; its latency
//! histograms arrive already bucketed, so [`Latency`] encodes them as they are.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use vmha_fs::status::{FsMetrics, Latencies, LATENCY_BOUNDS_US};

use crate::daemon::CounterValues;
use crate::state::Role;
use crate::status::Status;

type Labels = Vec<(String, String)>;
type Gauges = Family<Labels, Gauge>;
type FGauges = Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

fn role_name(role: Role) -> String {
    serde_json::to_value(role)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn b(v: bool) -> i64 {
    i64::from(v)
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Histograms bucketed by vmha-fs ([`LATENCY_BOUNDS_US`]), one per label set,
/// in seconds.
#[derive(Debug, Default)]
struct Latency(Vec<(Labels, Latencies)>);

impl EncodeMetric for Latency {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (labels, l) in &self.0 {
            let buckets: Vec<(f64, u64)> = LATENCY_BOUNDS_US
                .iter()
                .map(|&us| us as f64 / 1e6)
                .chain(std::iter::once(f64::MAX))
                .zip(l.buckets.iter().copied().chain(std::iter::repeat(0)))
                .collect();
            encoder
                .encode_family(labels)?
                .encode_histogram::<NoLabelSet>(l.sum_us as f64 / 1e6, l.count, &buckets, None)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Every role a module can have, for `vmha_module_role`.
const ROLES: [Role; 5] = [
    Role::Stop,
    Role::Wait,
    Role::Alone,
    Role::Prim,
    Role::Second,
];

/// Renders the metrics of `status`, `counters` and `fs` (this node's, per
/// module; `fs` for the modules whose writer runs here).
pub fn render(
    status: &Status,
    counters: &[(String, CounterValues)],
    fs: &[(String, FsMetrics)],
    failover_ms: u64,
) -> String {
    let mut registry = Registry::default();
    let role = Gauges::default();
    let ready = Gauges::default();
    let reachable = Gauges::default();
    let connected = Gauges::default();
    let maintenance = Gauges::default();
    let disk_failed = Gauges::default();
    let outofsync = Gauges::default();
    let resync_done = Gauges::default();
    let resync_rate = Gauges::default();
    let module_mismatch = Gauges::default();
    let last_seen = FGauges::default();
    let hb_age = FGauges::default();
    let hb_up = Gauges::default();
    let config_mismatch = Gauges::default();
    let witness = Gauges::default();
    let failovers = Family::<Labels, Counter>::default();
    let split_brains = Family::<Labels, Counter>::default();
    let checker_failures = Family::<Labels, Counter>::default();
    let replicated_bytes = Family::<Labels, Counter>::default();
    let replicated_ops = Family::<Labels, Counter>::default();
    let al_writes = Family::<Labels, Counter>::default();
    let early_syncs = Family::<Labels, Counter>::default();
    let fsyncs_peer_early = Family::<Labels, Counter>::default();
    let cached_writes = Family::<Labels, Counter>::default();
    let dirty = Gauges::default();
    let mut write_latency = Latency::default();
    let mut fsync_latency = Latency::default();
    let local = status.node.as_str();
    let mut peer_seen = None;
    for m in &status.modules {
        for (node, n) in &m.nodes {
            let base = [("module", m.name.as_str()), ("node", node.as_str())];
            let current = n.state.or(n.last_known_state.flatten());
            for r in ROLES {
                let name = role_name(r);
                let mut l = labels(&base);
                l.push(("role".to_string(), name));
                role.get_or_create(&l)
                    .set(b(n.reachable && current == Some(r)));
            }
            let l = labels(&base);
            ready.get_or_create(&l).set(b(n.ready));
            reachable.get_or_create(&l).set(b(n.reachable));
            connected.get_or_create(&l).set(b(
                n.reachable && matches!(n.state, Some(Role::Prim) | Some(Role::Second))
            ));
            maintenance.get_or_create(&l).set(b(n.maintenance));
            disk_failed
                .get_or_create(&l)
                .set(b(n.disk == Some(crate::state::Disk::Failed)));
            let (left, done, rate) = n.resync.map_or((0, 0, 0), |r| {
                (
                    r.total_bytes.saturating_sub(r.done_bytes),
                    r.done_bytes,
                    r.rate_bytes_per_s,
                )
            });
            outofsync.get_or_create(&l).set(i(left));
            resync_done.get_or_create(&l).set(i(done));
            resync_rate.get_or_create(&l).set(i(rate));
            if let Some(mm) = n.module_config_match {
                module_mismatch.get_or_create(&l).set(b(mm == Some(false)));
            }
            if node != local && peer_seen.is_none() {
                peer_seen = Some((node.clone(), n.clone()));
            }
        }
    }
    if let Some((peer, n)) = &peer_seen {
        if let Some(Some(ms)) = n.last_seen_ms {
            last_seen
                .get_or_create(&labels(&[("node", peer)]))
                .set(ms as f64 / 1000.0);
        }
        if let Some(beats) = &n.heartbeats {
            for (address, age) in beats {
                let l = labels(&[("node", peer), ("address", address)]);
                if let Some(ms) = age {
                    hb_age.get_or_create(&l).set(*ms as f64 / 1000.0);
                }
                hb_up
                    .get_or_create(&l)
                    .set(b(age.is_some_and(|ms| ms < failover_ms)));
            }
        }
        if let Some(m) = n.config_match {
            config_mismatch
                .get_or_create(&labels(&[("node", peer)]))
                .set(b(m == Some(false)));
        }
    }
    if let Some(w) = &status.witness {
        witness.get_or_create(&labels(&[("node", local)])).set(b(
            w.last_probe == Some(crate::state::WitnessOutcome::Reachable)
        ));
    }
    for (module, c) in counters {
        let l = labels(&[("module", module), ("node", local)]);
        failovers.get_or_create(&l).inc_by(c.failovers);
        split_brains.get_or_create(&l).inc_by(c.split_brains);
        checker_failures
            .get_or_create(&l)
            .inc_by(c.checker_failures);
    }
    for (module, m) in fs {
        let l = labels(&[("module", module), ("node", local)]);
        replicated_bytes
            .get_or_create(&l)
            .inc_by(m.replicated_bytes);
        replicated_ops.get_or_create(&l).inc_by(m.replicated_ops);
        al_writes.get_or_create(&l).inc_by(m.activity_log_writes);
        early_syncs.get_or_create(&l).inc_by(m.early_syncs);
        fsyncs_peer_early
            .get_or_create(&l)
            .inc_by(m.fsyncs_peer_early);
        cached_writes.get_or_create(&l).inc_by(m.cached_writes);
        dirty.get_or_create(&l).set(i(m.dirty_bytes));
        write_latency.0.push((l.clone(), m.write_latency.clone()));
        fsync_latency.0.push((l, m.fsync_latency.clone()));
    }
    registry.register(
        "vmha_module_role",
        "1 for the role the node has for the module (STOP, WAIT, ALONE, PRIM, SECOND), 0 for the others; all 0 for an unreachable peer",
        role,
    );
    registry.register(
        "vmha_module_ready",
        "1 when the node's copy is ready (green)",
        ready,
    );
    registry.register(
        "vmha_node_reachable",
        "1 when the node answers heartbeats (always 1 for the local node)",
        reachable,
    );
    registry.register(
        "vmha_module_connected",
        "1 when the node replicates with its peer (PRIM or SECOND)",
        connected,
    );
    registry.register(
        "vmha_module_maintenance",
        "1 when the module is in maintenance on the node",
        maintenance,
    );
    registry.register(
        "vmha_module_disk_failed",
        "1 when the node's own disk failed",
        disk_failed,
    );
    registry.register(
        "vmha_peer_outofsync_bytes",
        "Bytes the resync of this copy still has to copy (0 when none runs)",
        outofsync,
    );
    registry.register(
        "vmha_resync_done_bytes",
        "Bytes the running resync has copied",
        resync_done,
    );
    registry.register(
        "vmha_resync_rate_bytes_per_second",
        "Rate of the running resync",
        resync_rate,
    );
    registry.register(
        "vmha_module_config_mismatch",
        "1 when the module's configuration differs between the nodes (peer only)",
        module_mismatch,
    );
    registry.register(
        "vmha_peer_last_seen_seconds",
        "Seconds since the peer's last heartbeat on any network",
        last_seen,
    );
    registry.register(
        "vmha_peer_heartbeat_age_seconds",
        "Seconds since the peer's last heartbeat on this network (address)",
        hb_age,
    );
    registry.register(
        "vmha_peer_heartbeat_up",
        "1 when heartbeats arrive on this network within the failover timeout",
        hb_up,
    );
    registry.register(
        "vmha_config_mismatch",
        "1 when the peer's whole configuration hash differs from this node's",
        config_mismatch,
    );
    registry.register(
        "vmha_witness_reachable",
        "1 when the latest witness probe reached a witness (only with witnesses)",
        witness,
    );
    registry.register("vmha_module_failovers", "Times this node took the module over from a lost peer (SECOND to ALONE) since vmhad started", failovers);
    registry.register(
        "vmha_module_split_brains",
        "Split brains this node detected for the module since vmhad started",
        split_brains,
    );
    registry.register("vmha_module_checker_failures", "Checker failures (VM stopped or failed to start, vmha-fs failed or died, disk failed) since vmhad started", checker_failures);
    registry.register(
        "vmha_replicated_bytes",
        "Bytes of written data the module's writer on this node sent to a replicating peer since vmha-fs started",
        replicated_bytes,
    );
    registry.register(
        "vmha_replicated_ops",
        "Operations the module's writer on this node sent to a replicating peer since vmha-fs started",
        replicated_ops,
    );
    registry.register(
        "vmha_write_latency_seconds",
        "Latency of writes through the module's writer on this node, as the VM sees it",
        write_latency,
    );
    registry.register(
        "vmha_fsync_latency_seconds",
        "Latency of fsyncs through the module's writer on this node, as the VM sees it",
        fsync_latency,
    );
    registry.register(
        "vmha_activity_log_writes",
        "Activity-log updates the module's writer on this node wrote durably since vmha-fs started",
        al_writes,
    );
    registry.register(
        "vmha_early_syncs",
        "Syncs the module's writer on this node started right after a write that an fdatasync was expected to follow, since vmha-fs started",
        early_syncs,
    );
    registry.register(
        "vmha_fsyncs_peer_early",
        "fdatasyncs through the module's writer on this node that the peer's early sync answered (before they were sent, or in flight ahead of their acknowledgement), since vmha-fs started",
        fsyncs_peer_early,
    );
    registry.register(
        "vmha_cached_writes",
        "O_DIRECT writes the module's writer on this node applied to its copy through the page cache (local_writes = cached), since vmha-fs started",
        cached_writes,
    );
    registry.register(
        "vmha_dirty_bytes",
        "Bytes the module's writer on this node marked as written while alone (the peer lacks them)",
        dirty,
    );
    let mut out = String::new();
    if let Err(e) = encode(&mut out, &registry) {
        tracing::error!("cannot encode the metrics: {e}");
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn status() -> Status {
        serde_json::from_value(
            serde_json::json!({"node": "node1", "config_hash": "", "modules": []}),
        )
        .unwrap_or_else(|_| panic!("a minimal status"))
    }

    /// vmha-fs's counters and pre-bucketed histograms come out as Prometheus
    /// counters and cumulative histogram buckets, in seconds.
    #[test]
    fn fs_metrics_are_exported() {
        let mut buckets = vec![0; LATENCY_BOUNDS_US.len() + 1];
        buckets[0] = 2; // <= 50 µs
        buckets[4] = 1; // <= 1 ms
        *buckets.last_mut().unwrap() = 1; // > 5 s
        let fs = FsMetrics {
            replicated_bytes: 8192,
            replicated_ops: 3,
            activity_log_writes: 5,
            dirty_bytes: 4096,
            write_latency: Latencies {
                buckets,
                count: 4,
                sum_us: 6_000_900,
            },
            fsync_latency: Latencies::default(),
            early_syncs: 7,
            fsyncs_peer_early: 6,
            cached_writes: 9,
            ..FsMetrics::default()
        };
        let text = render(&status(), &[], &[("vm1".into(), fs)], 3000);
        for series in [
            "vmha_replicated_bytes_total{module=\"vm1\",node=\"node1\"} 8192",
            "vmha_replicated_ops_total{module=\"vm1\",node=\"node1\"} 3",
            "vmha_activity_log_writes_total{module=\"vm1\",node=\"node1\"} 5",
            "vmha_dirty_bytes{module=\"vm1\",node=\"node1\"} 4096",
            "vmha_early_syncs_total{module=\"vm1\",node=\"node1\"} 7",
            "vmha_fsyncs_peer_early_total{module=\"vm1\",node=\"node1\"} 6",
            "vmha_cached_writes_total{module=\"vm1\",node=\"node1\"} 9",
            "# TYPE vmha_write_latency_seconds histogram",
            "vmha_write_latency_seconds_sum{module=\"vm1\",node=\"node1\"} 6.0009",
            "vmha_write_latency_seconds_count{module=\"vm1\",node=\"node1\"} 4",
            "vmha_write_latency_seconds_bucket{le=\"0.00005\",module=\"vm1\",node=\"node1\"} 2",
            "vmha_write_latency_seconds_bucket{le=\"0.001\",module=\"vm1\",node=\"node1\"} 3",
            "vmha_write_latency_seconds_bucket{le=\"5.0\",module=\"vm1\",node=\"node1\"} 3",
            "vmha_write_latency_seconds_bucket{le=\"+Inf\",module=\"vm1\",node=\"node1\"} 4",
            "vmha_fsync_latency_seconds_count{module=\"vm1\",node=\"node1\"} 0",
        ] {
            assert!(text.contains(series), "missing `{series}` in\n{text}");
        }
    }
}
