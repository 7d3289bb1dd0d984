//! Rendering of admin API answers: aligned tables for people, JSON (one document per command)
//! for scripts.

use super::Format;
use crate::admin::pb;
use serde_json::{json, Value};

pub struct Printer {
    format: Format,
}

fn generation_json(g: &pb::Generation) -> Value {
    json!({
        "generation": g.generation,
        "digest": g.digest,
        "reference": g.reference,
        "created": g.created,
        "cause": g.cause,
        "source": g.source,
        "held": g.held,
        "verification": g.verification.as_ref().map(|v| json!({
            "status": v.status,
            "mode": v.mode,
            "key": v.key,
            "key_id": v.key_id,
            "signature": v.signature,
            "error": v.error,
            "checked": v.checked,
        })),
        "refused": if g.refused.is_empty() { Value::Null } else { Value::String(g.refused.clone()) },
    })
}

fn policy_json(p: &Option<pb::SignaturePolicy>) -> Value {
    match p {
        None => Value::Null,
        Some(p) => json!({
            "mode": p.mode,
            "node_default": p.node_default,
            "keys": p.keys.iter().map(|k| json!({
                "name": k.name,
                "id": k.id,
                "algorithm": k.algorithm,
            })).collect::<Vec<_>>(),
        }),
    }
}

/// The signature policy as one line: `enforce: ci.pub (ecdsa-p256)` / `none`.
fn policy_line(s: &pb::Stream) -> String {
    match &s.effective_policy {
        None => "none".into(),
        Some(p) => {
            let keys: Vec<String> = p
                .keys
                .iter()
                .map(|k| format!("{} ({}, {})", k.name, k.algorithm, short_digest(&k.id)))
                .collect();
            format!(
                "{}{}{}",
                p.mode,
                if keys.is_empty() {
                    String::new()
                } else {
                    format!(": {}", keys.join(", "))
                },
                if p.node_default {
                    " [node default]"
                } else {
                    ""
                }
            )
        }
    }
}

/// A generation's signature column: `verified (ci.pub)`, `unverified: …`, `-`; with
/// `REFUSED` when an enforce policy does not let it run.
fn signature_cell(g: &pb::Generation) -> String {
    let checked = match &g.verification {
        None => "-".to_string(),
        Some(v) if v.status == "verified" => format!("verified ({})", v.key),
        Some(v) => format!("unverified: {}", v.error),
    };
    if g.refused.is_empty() {
        checked
    } else if g.verification.is_none() {
        "REFUSED: not verified".into()
    } else {
        format!("REFUSED: {checked}")
    }
}

fn tag_json(t: &pb::Tag) -> Value {
    let mut v = json!({
        "name": t.name,
        "source": t.source,
        "generations": t.generations.iter().map(generation_json).collect::<Vec<_>>(),
    });
    if !t.warning.is_empty() {
        v["warning"] = Value::String(t.warning.clone());
    }
    if t.import_interval_secs > 0 {
        v["import_interval_secs"] = json!(t.import_interval_secs);
    }
    if let Some(c) = &t.import_condition {
        v["import_condition"] = json!({
            "last_check": c.last_check,
            "last_success": c.last_success,
            "error": c.error,
            "consecutive_failures": c.consecutive_failures,
        });
    }
    v
}

/// `every 15m, ok at …` / `every 15m, failing (3): …` / `-`.
fn import_line(t: &pb::Tag) -> String {
    if t.import_interval_secs == 0 {
        return "-".into();
    }
    let every = match t.import_interval_secs {
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    };
    match &t.import_condition {
        Some(c) if !c.error.is_empty() => format!(
            "every {every}, failing ({}x since {}): {}",
            c.consecutive_failures,
            if c.last_success.is_empty() {
                "never"
            } else {
                &c.last_success
            },
            c.error
        ),
        Some(c) => format!("every {every}, ok at {}", c.last_check),
        None => format!("every {every}"),
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

fn access_json(s: &pb::Stream) -> Value {
    let a = s.access.clone().unwrap_or_default();
    json!({ "allow": a.allow, "deny": a.deny })
}

/// The access list as one line: who may use the stream.
fn access_line(s: &pb::Stream) -> String {
    let a = s.access.clone().unwrap_or_default();
    let mut line = format!("{} (own namespace)", s.namespace);
    for p in &a.allow {
        line.push_str(&format!(", {p}"));
    }
    if !a.deny.is_empty() {
        line.push_str(&format!("; denied: {}", a.deny.join(", ")));
    }
    line
}

fn stream_json(s: &pb::Stream) -> Value {
    json!({
        "namespace": s.namespace,
        "name": s.name,
        "lookup_local": s.lookup_local,
        "access": access_json(s),
        "policy": policy_json(&s.policy),
        "effective_policy": policy_json(&s.effective_policy),
        "tags": s.tags.iter().map(tag_json).collect::<Vec<_>>(),
    })
}

/// Prints rows as columns separated by at least two spaces.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn short_digest(d: &str) -> String {
    match d.strip_prefix("sha256:") {
        Some(hex) if hex.len() > 12 => format!("sha256:{}", &hex[..12]),
        _ => d.to_string(),
    }
}

impl Printer {
    pub fn new(format: Format) -> Self {
        Self { format }
    }

    pub fn json(&self, v: &impl serde::Serialize) {
        match serde_json::to_string_pretty(v) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("error: cannot render JSON: {e}"),
        }
    }

    pub fn done(&self, message: &str) {
        match self.format {
            Format::Json => self.json(&json!({ "ok": true, "message": message })),
            Format::Table => println!("{message}"),
        }
    }

    /// The files `peer certs` wrote, and each node's three files.
    pub fn peer_certs(
        &self,
        dir: &std::path::Path,
        nodes: &[crate::peer::tls::NodeSpec],
        written: &[std::path::PathBuf],
    ) {
        use crate::peer::tls::{TlsFiles, CA_CERT_FILE};
        let node_files: Vec<(String, TlsFiles)> = nodes
            .iter()
            .map(|n| {
                let files = TlsFiles {
                    ca_file: dir.join(CA_CERT_FILE),
                    cert_file: dir.join(format!("{}.pem", n.name)),
                    key_file: dir.join(format!("{}-key.pem", n.name)),
                };
                (n.name.clone(), files)
            })
            .collect();
        match self.format {
            Format::Json => self.json(&json!({
                "written": written,
                "nodes": node_files
                    .iter()
                    .map(|(name, f)| json!({
                        "name": name,
                        "peer_ca_file": f.ca_file,
                        "peer_cert_file": f.cert_file,
                        "peer_key_file": f.key_file,
                    }))
                    .collect::<Vec<_>>(),
            })),
            Format::Table => {
                for path in written {
                    println!("wrote {}", path.display());
                }
                println!();
                let rows: Vec<Vec<String>> = node_files
                    .iter()
                    .map(|(name, f)| {
                        vec![
                            name.clone(),
                            f.ca_file.display().to_string(),
                            f.cert_file.display().to_string(),
                            f.key_file.display().to_string(),
                        ]
                    })
                    .collect();
                table(
                    &["NODE", "PEER_CA_FILE", "PEER_CERT_FILE", "PEER_KEY_FILE"],
                    &rows,
                );
            }
        }
    }

    pub fn status(&self, r: &pb::StatusResponse) {
        match self.format {
            Format::Json => self.json(&json!({
                "store": r.store,
                "endpoints": r.endpoints,
                "connected": r.connected,
                "revision": r.revision,
                "stale_seconds": (r.stale_seconds >= 0.0).then_some(r.stale_seconds),
                "last_sync_time": r.last_sync_time,
                "error": r.error,
                "importer": r.importer,
                "importer_node": r.importer_node,
                "streams": r.streams,
                "node_name": r.node_name,
            })),
            Format::Table => {
                println!("Node:       {}", r.node_name);
                println!("Streams:    {}", r.streams);
                if r.store == "embedded" {
                    println!("Store:      embedded (this node only)");
                    return;
                }
                println!("Store:      etcd {}", r.endpoints);
                let state = if r.connected {
                    "connected".to_string()
                } else {
                    format!("UNREACHABLE: {}", r.error)
                };
                println!("Link:       {state}");
                let stale = if r.stale_seconds < 0.0 {
                    "never synced (resolving from the saved view, if any)".to_string()
                } else {
                    format!(
                        "{:.1}s ago (revision {}, at {})",
                        r.stale_seconds, r.revision, r.last_sync_time
                    )
                };
                println!("View:       current as of {stale}");
                let who = if r.importer {
                    "this node".to_string()
                } else if r.importer_node.is_empty() {
                    "unknown".to_string()
                } else {
                    r.importer_node.clone()
                };
                println!("Importer:   {who}");
            }
        }
    }

    pub fn stream_created(&self, s: &pb::Stream) {
        match self.format {
            Format::Json => self.json(&stream_json(s)),
            Format::Table => println!(
                "stream {}/{} created{}",
                s.namespace,
                s.name,
                if s.lookup_local {
                    " (lookup_local: short names resolve in its namespace)"
                } else {
                    ""
                }
            ),
        }
    }

    pub fn streams(&self, streams: &[pb::Stream]) {
        match self.format {
            Format::Json => self.json(&streams.iter().map(stream_json).collect::<Vec<_>>()),
            Format::Table => table(
                &["NAMESPACE", "NAME", "LOOKUP_LOCAL", "TAGS"],
                &streams
                    .iter()
                    .map(|s| {
                        vec![
                            s.namespace.clone(),
                            s.name.clone(),
                            s.lookup_local.to_string(),
                            s.tags
                                .iter()
                                .map(|t| t.name.as_str())
                                .collect::<Vec<_>>()
                                .join(","),
                        ]
                    })
                    .collect::<Vec<_>>(),
            ),
        }
    }

    pub fn stream(&self, s: &pb::Stream) {
        match self.format {
            Format::Json => self.json(&stream_json(s)),
            Format::Table => {
                println!("Stream:        {}/{}", s.namespace, s.name);
                println!("Lookup local:  {}", s.lookup_local);
                println!("Used by:       {}", access_line(s));
                println!("Signatures:    {}", policy_line(s));
                println!();
                table(
                    &[
                        "TAG",
                        "GENERATION",
                        "DIGEST",
                        "CAUSE",
                        "UPDATED",
                        "SOURCE",
                        "IMPORT",
                    ],
                    &s.tags
                        .iter()
                        .map(|t| {
                            let g = t.generations.first();
                            vec![
                                t.name.clone(),
                                g.map(|g| g.generation.to_string()).unwrap_or_default(),
                                g.map(|g| short_digest(&g.digest)).unwrap_or_default(),
                                g.map(|g| g.cause.clone()).unwrap_or_default(),
                                g.map(|g| g.created.clone()).unwrap_or_default(),
                                g.map(|g| g.source.clone()).unwrap_or_default(),
                                import_line(t),
                            ]
                        })
                        .collect::<Vec<_>>(),
                );
                println!();
                println!("History (ON NODE: this node's cache holds the image completely; SIGNATURE: REFUSED generations may not run under the enforce policy, `imagestream tag verify` checks them again):");
                table(
                    &[
                        "TAG",
                        "GENERATION",
                        "DIGEST",
                        "CAUSE",
                        "ON NODE",
                        "SIGNATURE",
                    ],
                    &s.tags
                        .iter()
                        .flat_map(|t| {
                            t.generations.iter().map(|g| {
                                vec![
                                    t.name.clone(),
                                    g.generation.to_string(),
                                    short_digest(&g.digest),
                                    g.cause.clone(),
                                    yes_no(g.held),
                                    signature_cell(g),
                                ]
                            })
                        })
                        .collect::<Vec<_>>(),
                );
            }
        }
    }

    pub fn policy(&self, s: &pb::Stream) {
        match self.format {
            Format::Json => self.json(&stream_json(s)),
            Format::Table => {
                println!(
                    "stream {}/{} signature policy: {}",
                    s.namespace,
                    s.name,
                    policy_line(s)
                );
                let refused: Vec<String> = s
                    .tags
                    .iter()
                    .filter_map(|t| {
                        let g = t.generations.first()?;
                        (!g.refused.is_empty()).then(|| {
                            format!(
                                "  {}/{}:{} generation {}: {}",
                                s.namespace, s.name, t.name, g.generation, g.refused
                            )
                        })
                    })
                    .collect();
                if !refused.is_empty() {
                    println!("tags whose current generation may not run until verified (imagestream tag verify):");
                    for line in refused {
                        println!("{line}");
                    }
                }
            }
        }
    }

    pub fn access(&self, s: &pb::Stream) {
        match self.format {
            Format::Json => self.json(&stream_json(s)),
            Format::Table => println!(
                "stream {}/{} may be used by: {}",
                s.namespace,
                s.name,
                access_line(s)
            ),
        }
    }

    pub fn tag_moved(&self, name: &str, t: &pb::Tag) {
        if !t.warning.is_empty() {
            eprintln!("warning: {}", t.warning);
        }
        match self.format {
            Format::Json => self.json(&tag_json(t)),
            Format::Table => match t.generations.first() {
                Some(g) => println!(
                    "{name} -> {} (generation {}, {}{})",
                    g.reference,
                    g.generation,
                    g.cause,
                    if g.verification.is_some() {
                        format!(", signature {}", signature_cell(g))
                    } else {
                        String::new()
                    }
                ),
                None => println!("{name} has no generations"),
            },
        }
    }

    pub fn history(&self, t: &pb::Tag) {
        match self.format {
            Format::Json => self.json(&tag_json(t)),
            Format::Table => table(
                &[
                    "GENERATION",
                    "CREATED",
                    "CAUSE",
                    "ON NODE",
                    "SOURCE",
                    "REFERENCE",
                    "SIGNATURE",
                ],
                &t.generations
                    .iter()
                    .map(|g| {
                        vec![
                            g.generation.to_string(),
                            g.created.clone(),
                            g.cause.clone(),
                            yes_no(g.held),
                            g.source.clone(),
                            g.reference.clone(),
                            signature_cell(g),
                        ]
                    })
                    .collect::<Vec<_>>(),
            ),
        }
    }

    pub fn resolved(&self, r: &pb::ResolveResponse) {
        match self.format {
            Format::Json => self.json(&json!({
                "reference": r.reference,
                "is_stream": r.is_stream,
                "stream": if r.is_stream { Value::String(format!("{}/{}", r.stream_namespace, r.stream_name)) } else { Value::Null },
                "tag": if r.is_stream { Value::String(r.tag.clone()) } else { Value::Null },
                "generation": if r.is_stream { json!(r.generation) } else { Value::Null },
                "digest": if r.is_stream { Value::String(r.digest.clone()) } else { Value::Null },
            })),
            Format::Table => {
                if r.is_stream {
                    println!(
                        "{} (stream {}/{}:{}, generation {})",
                        r.reference, r.stream_namespace, r.stream_name, r.tag, r.generation
                    );
                } else {
                    println!("{} (not a stream reference: passed to the runtime unchanged)", r.reference);
                }
            }
        }
    }

    pub fn cache(&self, r: &pb::ListCacheResponse) {
        match self.format {
            Format::Json => self.json(
                &r.blobs
                    .iter()
                    .map(|b| {
                        json!({
                            "digest": b.digest,
                            "size": b.size,
                            "last_used": b.last_used,
                            "pinned_by": b.pinned_by,
                        })
                    })
                    .collect::<Vec<_>>(),
            ),
            Format::Table => {
                let rows: Vec<Vec<String>> = r
                    .blobs
                    .iter()
                    .map(|b| {
                        vec![
                            short_digest(&b.digest),
                            human_bytes(b.size),
                            b.last_used.clone(),
                            if b.pinned_by.is_empty() {
                                "-".into()
                            } else {
                                b.pinned_by.join(",")
                            },
                        ]
                    })
                    .collect();
                table(&["DIGEST", "SIZE", "LAST USED", "PINNED BY"], &rows);
                println!(
                    "{} blobs, {} of {}",
                    r.blobs.len(),
                    human_bytes(r.size_bytes),
                    human_bytes(r.limit_bytes)
                );
            }
        }
    }

    pub fn cache_verified(&self, r: &pb::VerifyCacheResponse) {
        match self.format {
            Format::Json => self.json(&json!({
                "checked": r.checked,
                "ok": r.ok,
                "evicted": r.evicted,
            })),
            Format::Table => {
                println!(
                    "checked {} blobs: {} ok, {} evicted",
                    r.checked,
                    r.ok,
                    r.evicted.len()
                );
                for d in &r.evicted {
                    println!("evicted {d} (bytes did not match the digest)");
                }
            }
        }
    }

    pub fn cache_gc(&self, r: &pb::GcCacheResponse) {
        match self.format {
            Format::Json => self.json(&json!({
                "evicted": r.evicted,
                "freed_bytes": r.freed_bytes,
                "size_bytes": r.size_bytes,
                "limit_bytes": r.limit_bytes,
            })),
            Format::Table => {
                for d in &r.evicted {
                    println!("evicted {d}");
                }
                println!(
                    "freed {}; the cache holds {} of {}",
                    human_bytes(r.freed_bytes),
                    human_bytes(r.size_bytes),
                    human_bytes(r.limit_bytes)
                );
            }
        }
    }
}

impl Printer {
    /// One tag event per line (JSON lines with `-o json`), flushed at once.
    pub fn event(&self, e: &pb::TagEvent) {
        use std::io::Write as _;
        let digest = |d: &str| {
            if d.is_empty() {
                "-".to_string()
            } else {
                short_digest(d)
            }
        };
        match self.format {
            Format::Json => println!(
                "{}",
                json!({
                    "sequence": e.sequence,
                    "namespace": e.namespace,
                    "stream": e.stream,
                    "tag": e.tag,
                    "old_digest": if e.old_digest.is_empty() { Value::Null } else { Value::String(e.old_digest.clone()) },
                    "new_digest": if e.new_digest.is_empty() { Value::Null } else { Value::String(e.new_digest.clone()) },
                    "generation": e.generation,
                    "cause": e.cause,
                    "time": e.time,
                    "signature": if e.signature.is_empty() { Value::Null } else { Value::String(e.signature.clone()) },
                })
            ),
            Format::Table => println!(
                "{}  {}/{}:{}  {} -> {}  generation {}  {}",
                e.time,
                e.namespace,
                e.stream,
                e.tag,
                digest(&e.old_digest),
                digest(&e.new_digest),
                e.generation,
                if e.signature.is_empty() {
                    e.cause.clone()
                } else {
                    format!("{}  signature: {}", e.cause, e.signature)
                }
            ),
        }
        let _ = std::io::stdout().flush();
    }
}

/// `1536` → `1.5 KiB`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
