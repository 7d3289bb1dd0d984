//! critest parity: the CRI conformance suite (`critest`, cri-tools v1.34.0) run twice in one test
//! bed, first directly against the runtime (`IMAGESTREAM_TEST_RUNTIME`), then through imagestream
//! in front of the same runtime. It proves that:
//!
//! (a) every spec that passes directly also passes through the proxy: a real CRI client suite
//!     (image pulls, status and removal by tag, digest and id, pod sandboxes with their own
//!     network, containers, exec/attach/port-forward URLs, errors and deadlines) cannot tell the
//!     proxy from the runtime;
//! (b) the direct run fails exactly the specs of `tests/critest-baseline-<runtime>.txt`, those that fail
//!     in this bed whatever the proxy does (the file says why), so that a new failure of the
//!     machine or the bed shows up as such and is not taken for a proxy regression, and a fixed
//!     one leaves the list.
//!
//! A spec that fails only through the proxy, or directly outside the baseline, is run once more
//! on its own (`--ginkgo.focus`) before it counts, so that a one-off timing failure of a spec is
//! reported as flaky rather than failing the test (unless there are more than [`MAX_AGAIN`]).
//! One that fails through the proxy twice is then run directly once more: if it fails there too,
//! the first direct run won a race in the runtime, and it is reported as such, not as a
//! regression. Likewise a listed spec that passed directly must pass again to count as fixed.
//! Each run takes about two minutes here (2 vCPUs); the whole test about five.
//!
//! The bed (its own network namespace, look-alike images of the ones critest pulls, `hosts.toml`,
//! CNI) is `tests/common/critest.rs`. critest's output and JUnit reports are kept in
//! `target/tmp/critest/`. Skipped: Windows, SELinux and AppArmor specs (none apply here).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use common::critest::{self, Critest, CritestRun};
use common::daemon::Daemon;
use common::{Registry, RuntimeBed, RuntimeKind};

const TEST: &str = "critest_passes_through_imagestream_as_it_does_directly";

/// `--ginkgo.skip` patterns (critest itself adds "benchmark").
const SKIP: &[&str] = &["Windows|SELinux|AppArmor"];

/// The same spec order in every run.
const SEED: u64 = 1;

/// The direct run's expected failures on the runtime of this run.
fn baseline_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
        "tests/critest-baseline-{}.txt",
        RuntimeKind::from_env().name()
    ))
}

fn list(title: &str, names: &BTreeSet<String>) {
    eprintln!("{title} ({}):", names.len());
    for n in names {
        eprintln!("  {n}");
    }
}

/// More suspects than this are not run again: that many failures are no one-off.
const MAX_AGAIN: usize = 10;

/// Runs `suspects` again on their own with `bed`; returns those that did not pass again and
/// those that did. More than [`MAX_AGAIN`] all count as failed.
fn again(
    bed: &Critest,
    label: &str,
    suspects: &BTreeSet<String>,
) -> (BTreeSet<String>, BTreeSet<String>) {
    if suspects.is_empty() || suspects.len() > MAX_AGAIN {
        return (suspects.clone(), BTreeSet::new());
    }
    let only: Vec<String> = suspects.iter().cloned().collect();
    let run = Critest {
        only: &only,
        ..*bed
    }
    .run(label);
    eprintln!("{}", run.summary());
    suspects
        .iter()
        .cloned()
        .partition(|n| run.specs.get(n).map(String::as_str) != Some("passed"))
}

/// Runs `specs` directly once more (as `label`): returns those that passed again and those
/// that did not. More than [`MAX_AGAIN`] all count as passed: that many are no race.
fn rerun_direct_passes(
    direct: &Critest,
    label: &str,
    specs: &BTreeSet<String>,
) -> (BTreeSet<String>, BTreeSet<String>) {
    if specs.len() > MAX_AGAIN {
        return (specs.clone(), BTreeSet::new());
    }
    let (failed, passed) = again(direct, label, specs);
    (passed, failed)
}

fn status_of(run: &CritestRun, name: &str) -> String {
    run.specs
        .get(name)
        .cloned()
        .unwrap_or_else(|| "not run".into())
}

#[test]
fn critest_passes_through_imagestream_as_it_does_directly() {
    if critest::reran_in_own_netns(TEST) {
        return;
    }
    let started = Instant::now();
    let registry = Registry::start();
    let images = critest::push_look_alike_images(&registry);
    eprintln!(
        "critest bed: {} look-alike image references pushed to {} ({:.1?})",
        images.len(),
        registry.addr,
        started.elapsed()
    );
    // Not RuntimeBed::start: that pushes the harness's pause image over the bed's.
    let mut ctd = RuntimeBed::start_with_registry_addr(&registry.addr);
    critest::prepare_runtime(&mut ctd, &registry);
    let work = tempfile::Builder::new()
        .prefix("isctwork-")
        .tempdir()
        .expect("critest work dir");
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("critest");
    eprintln!(
        "critest bed: {} at {} ready ({:.1?}); critest output goes to {}",
        ctd.kind.name(),
        ctd.endpoint(),
        started.elapsed(),
        out_dir.display()
    );

    let direct_bed = Critest {
        socket: &ctd.socket,
        out_dir: &out_dir,
        work_dir: work.path(),
        skip: SKIP,
        only: &[],
        seed: SEED,
    };
    let direct = direct_bed.run("direct");
    eprintln!("{}", direct.summary());

    let daemon = Daemon::start(&ctd.endpoint(), &[], &[]);
    let proxy_bed = Critest {
        socket: &daemon.cri_socket,
        ..direct_bed
    };
    let proxied = proxy_bed.run("imagestream");
    eprintln!("{}", proxied.summary());
    let calls: f64 = daemon
        .metrics()
        .lines()
        .filter(|l| l.starts_with("imagestream_cri_calls_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    eprintln!("imagestream counted {calls} CRI calls (imagestream_cri_calls_total)");

    // (a) Passed directly, not through the proxy.
    let suspects: BTreeSet<String> = direct
        .passed()
        .difference(&proxied.passed())
        .cloned()
        .collect();
    for name in &suspects {
        eprintln!(
            "only through imagestream: {name}: {}",
            status_of(&proxied, name)
        );
    }
    let (failed_again, flaky_proxied) = again(&proxy_bed, "imagestream-again", &suspects);
    // A spec that failed through the proxy twice is run directly once more too: one that
    // fails there as well is a race in the runtime that the direct run happened to win
    // (CRI-O's execSync-with-timeout kills its process asynchronously), not the proxy's doing.
    let (regressions, racy_in_runtime) =
        rerun_direct_passes(&direct_bed, "direct-again-suspects", &failed_again);

    // (b) Failed directly, not in the baseline.
    let baseline = critest::read_spec_list(&baseline_path());
    let direct_failed = direct.failed();
    let new_direct: BTreeSet<String> = direct_failed.difference(&baseline).cloned().collect();
    let (new_failures, flaky_direct) = again(&direct_bed, "direct-again", &new_direct);
    // A listed spec that passed directly: it counts as fixed only if it passes again.
    let (baseline_passed, racy_baseline) = rerun_direct_passes(
        &direct_bed,
        "direct-again-listed",
        &baseline.difference(&direct_failed).cloned().collect(),
    );
    // Not asserted, but a proxy should not make a failing spec pass either.
    let only_direct: BTreeSet<String> = direct_failed
        .intersection(&proxied.passed())
        .cloned()
        .collect();

    eprintln!(
        "\n==== critest parity ({:.0?} in all) ====",
        started.elapsed()
    );
    eprintln!("{}", direct.summary());
    eprintln!("{}", proxied.summary());
    list("failed directly", &direct_failed);
    list(
        "failed through imagestream, not directly (regressions, each failed twice)",
        &regressions,
    );
    list(
        "failed through imagestream once, passed when run again (flaky?)",
        &flaky_proxied,
    );
    list(
        "failed through imagestream twice, and directly when run again (a race in the runtime)",
        &racy_in_runtime,
    );
    list(
        "in tests/critest-baseline-<runtime>.txt, passed directly once, failed when run again (a race in the runtime)",
        &racy_baseline,
    );
    list(
        "failed directly, not in tests/critest-baseline-<runtime>.txt (each failed twice)",
        &new_failures,
    );
    list(
        "failed directly once outside the baseline, passed when run again (flaky?)",
        &flaky_direct,
    );
    list(
        "in tests/critest-baseline-<runtime>.txt but did not fail directly",
        &baseline_passed,
    );
    list(
        "failed directly, passed through imagestream (the proxy changed an answer?)",
        &only_direct,
    );
    eprintln!("critest logs and reports: {}", out_dir.display());

    drop(daemon);
    drop(ctd);
    common::unmount_under(work.path());

    assert!(
        regressions.is_empty(),
        "{} spec(s) pass directly but fail through imagestream: {regressions:#?}",
        regressions.len()
    );
    assert!(
        new_failures.is_empty() && baseline_passed.is_empty(),
        "the direct run's failures differ from {}: the machine or the bed changed (a spec that \
         cannot pass here goes there, with the reason; one that passes now comes out):\n\
         failed, not listed: {new_failures:#?}\nlisted, did not fail: {baseline_passed:#?}",
        baseline_path().display()
    );
}
