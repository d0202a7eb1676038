//! Mesh formation at scale, against stock EPMD, in one run.
//!
//! P pods × N nodes (network-namespace pods, as in the e2e suite), all
//! started at once; then every node pings every other at the same instant
//! (`-connect_all false`, so only those pings connect) and the pairs that
//! answered `pang` retry once, immediately. Layouts, one lab each, one after
//! the other:
//!
//! - reference: stock `epmd` per pod, each node on its own port reachable
//!   from everywhere (possible only because the lab opens every port);
//! - distproxy, stock peers: lookup correlation (one advertised port, or a
//!   pool of K with `--pool K`), same-pod pairs through mirror listeners;
//! - distproxy, module peers: the `distproxy_epmd` tunnel.
//!
//! Prints, per layout: time to the full mesh (first round + retry), `pang`
//! in the first round and after the retry, misroutes, and the ratio of the
//! time to the reference's.
//!
//! With `--seeded`, the nodes run OTP's defaults instead (`connect_all`):
//! every node but the first pings the first, all at once, and `global`
//! connects the rest as it does in users' clusters. Prints the time until
//! every node lists all the others (or which are missing after 180 s).
//!
//! Run as root, by hand (needs erlang-nox and iproute2):
//!
//! ```text
//! cargo bench --bench mesh -- 3 8
//! cargo bench --bench mesh -- 4 12 --pool 4
//! cargo bench --bench mesh -- 4 12 --ttl 1000 --only stock
//! cargo bench --bench mesh -- 8 16 --seeded
//! cargo bench --bench mesh -- 8 16 --only stock --sidecar-config limits.toml
//! ```
//!
//! `--sidecar-config FILE` starts the sidecars of the plain stock and
//! module layouts with that configuration (not the `--pool`/`--ttl` ones).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use support::mesh::{secs, start_mesh, MeshLab, MeshLayout, MeshMode, MeshReport};

struct Variant {
    label: String,
    mode: MeshMode,
    config: Option<String>,
}

impl Variant {
    /// Starts this layout's lab (`connect_all`: OTP's default, for the
    /// seeded join).
    fn start(&self, pods: usize, nodes: usize, connect_all: bool) -> MeshLab {
        start_mesh(&MeshLayout {
            pods,
            nodes,
            mode: self.mode,
            sidecar_config: self.config.clone(),
            connect_all,
        })
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench mesh -- PODS NODES [--pool K]... [--ttl MS]... \
         [--only reference|stock|module]... [--seeded] [--sidecar-config TOML]"
    );
    std::process::exit(64);
}

fn pool_config(k: u16, ttl: Option<u64>) -> String {
    let ports: Vec<String> = (0..k)
        .map(|i| format!("\"0.0.0.0:{}\"", 43691 + i))
        .collect();
    let mut toml = format!("[dist]\nlisten = [{}]\n", ports.join(", "));
    if let Some(ttl) = ttl {
        toml.push_str(&format!("[routing]\nlookup_ttl_ms = {ttl}\n"));
    }
    toml
}

fn main() {
    let mut positional = Vec::new();
    let mut pools = Vec::new();
    let mut ttls = Vec::new();
    let mut only = Vec::new();
    let mut seeded = false;
    let mut extra_toml: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--bench" => {}
            "--pool" => pools.push(
                args.next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage()),
            ),
            "--ttl" => ttls.push(
                args.next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage()),
            ),
            "--only" => only.push(args.next().unwrap_or_else(|| usage())),
            "--seeded" => seeded = true,
            "--sidecar-config" => {
                let path = args.next().unwrap_or_else(|| usage());
                extra_toml = Some(std::fs::read_to_string(&path).unwrap_or_else(|e| {
                    eprintln!("{path}: {e}");
                    std::process::exit(64)
                }));
            }
            other if other.starts_with('-') => usage(),
            other => positional.push(other.parse::<usize>().unwrap_or_else(|_| usage())),
        }
    }
    let (pods, nodes) = match positional[..] {
        [p, n] => (p, n),
        [] => (3, 8),
        _ => usage(),
    };
    if !support::e2e_enabled("benches/mesh", &["ss"]) {
        return;
    }
    let wanted = |what: &str| only.is_empty() || only.iter().any(|o| o == what);

    let mut variants = Vec::new();
    if wanted("reference") {
        variants.push(Variant {
            label: MeshMode::Reference.label().into(),
            mode: MeshMode::Reference,
            config: None,
        });
    }
    if wanted("stock") {
        variants.push(Variant {
            label: MeshMode::StockPeers.label().into(),
            mode: MeshMode::StockPeers,
            config: extra_toml.clone(),
        });
        for &k in &pools {
            variants.push(Variant {
                label: format!("{}, pool of {k} ports", MeshMode::StockPeers.label()),
                mode: MeshMode::StockPeers,
                config: Some(pool_config(k, None)),
            });
        }
        for &ttl in &ttls {
            variants.push(Variant {
                label: format!("{}, lookup_ttl_ms {ttl}", MeshMode::StockPeers.label()),
                mode: MeshMode::StockPeers,
                config: Some(pool_config(1, Some(ttl))),
            });
        }
    }
    if wanted("module") {
        variants.push(Variant {
            label: MeshMode::ModulePeers.label().into(),
            mode: MeshMode::ModulePeers,
            config: extra_toml.clone(),
        });
    }

    if seeded {
        return seeded_join(pods, nodes, variants);
    }
    let pairs = pods * nodes * (pods * nodes - 1);
    println!(
        "mesh formation: {pods} pods x {nodes} nodes, {pairs} pings, all at once (-connect_all false)"
    );
    let mut rows: Vec<(String, MeshReport, Duration, f64)> = Vec::new();
    for v in variants {
        eprintln!("mesh: {} ...", v.label);
        let mut mesh = v.start(pods, nodes, false);
        let report = mesh.form();
        let lookups_held = mesh.metric_total("distproxy_lookups_held_total", &[]);
        let refused = mesh.metric_total("distproxy_connections_refused_total", &[]);
        let total = report.first.elapsed + report.retry.elapsed;
        eprintln!(
            "mesh: {}: {}s, {} pang, {} after retry, lookups held {}, connections refused {}",
            v.label,
            secs(total),
            report.first.failed.len(),
            report.retry.failed.len(),
            lookups_held as u64,
            refused as u64
        );
        rows.push((v.label, report, total, lookups_held));
        drop(mesh);
    }

    let reference = rows
        .iter()
        .find(|(_, r, _, _)| r.mode == MeshMode::Reference)
        .map(|(_, _, t, _)| *t);
    println!();
    println!("| layout | mode | full mesh (s) | first round (s) | pang first round | pang after retry | misroutes | lookups held | vs reference |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (label, r, total, held) in &rows {
        let ratio = match reference {
            Some(reference) if reference > Duration::ZERO => {
                format!("{:.2}x", total.as_secs_f64() / reference.as_secs_f64())
            }
            _ => "-".into(),
        };
        println!(
            "| {pods}x{nodes} | {label} | {} | {} | {} | {} | {} | {} | {ratio} |",
            secs(*total),
            secs(r.first.elapsed),
            r.first.failed.len(),
            r.retry.failed.len(),
            r.misroutes as u64,
            *held as u64
        );
    }
}

/// `--seeded`: OTP's defaults, every node joins through the first.
fn seeded_join(pods: usize, nodes: usize, variants: Vec<Variant>) {
    const DEADLINE: Duration = Duration::from_secs(180);
    println!(
        "mesh formation: {pods} pods x {nodes} nodes with OTP's defaults (connect_all), \
         every node pinging the first at once"
    );
    let mut rows = Vec::new();
    for v in variants {
        eprintln!("mesh: {} ...", v.label);
        let mut mesh = v.start(pods, nodes, true);
        let joined = mesh.join_via_seed(DEADLINE);
        if let Err(e) = &joined {
            eprintln!("mesh: {}: {e}", v.label);
        }
        let held = mesh.metric_total("distproxy_lookups_held_total", &[]);
        let misroutes = mesh.metric_total("distproxy_misroutes_total", &[]);
        rows.push((v.label, v.mode, joined.ok(), held, misroutes));
        drop(mesh);
    }
    let reference = rows
        .iter()
        .find(|r| r.1 == MeshMode::Reference)
        .and_then(|r| r.2);
    println!();
    println!("| layout | mode | full mesh (s) | misroutes | lookups held | vs reference |");
    println!("|---|---|---|---|---|---|");
    for (label, _, took, held, misroutes) in &rows {
        let ratio = match (took, reference) {
            (Some(t), Some(r)) if r > Duration::ZERO => {
                format!("{:.2}x", t.as_secs_f64() / r.as_secs_f64())
            }
            _ => "-".into(),
        };
        let took = took.map_or(format!("not full after {}", secs(DEADLINE)), secs);
        println!(
            "| {pods}x{nodes} | {label} | {took} | {} | {} | {ratio} |",
            *misroutes as u64, *held as u64
        );
    }
}
