//! The libdatachannel (node-datachannel) baseline peer of `interop-tests/ndc/` works on loopback:
//! every test runs, its result lines parse and its figures are sane. Correctness only: no
//! speed is asserted (the figures are printed, for benchmarks to compare with).

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use peermesh_interop_tests::ndc::{run_pair_with, NdcFigures, NdcOptions, NdcResult, NdcTest};

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

async fn run(test: NdcTest) -> NdcResult {
    let opts = NdcOptions {
        timeout: Duration::from_secs(20),
        ..NdcOptions::default()
    };
    let started = Instant::now();
    let res = run_pair_with(test, None, None, LOOPBACK, LOOPBACK, &opts)
        .await
        .unwrap_or_else(|e| panic!("ndc {}: {e:#}", test.name()));
    println!(
        "ndc {}: {:?} (open {:.1} ms; run {:.2} s)",
        test.name(),
        res.figures,
        res.open_ms,
        started.elapsed().as_secs_f64()
    );
    assert!(res.open_ms > 0.0, "open time {} ms", res.open_ms);
    res
}

#[tokio::test]
async fn ndc_baseline_pair_on_loopback() {
    let open = run(NdcTest::Open).await;
    assert_eq!(open.figures, NdcFigures::Open);

    let rtt = run(NdcTest::Rtt {
        count: 200,
        size: 64,
    })
    .await;
    let NdcFigures::Rtt(r) = rtt.figures else {
        panic!("rtt gave {:?}", rtt.figures)
    };
    assert_eq!((r.count, r.size), (200, 64));
    assert!(r.min_ms > 0.0 && r.median_ms >= r.min_ms, "{r:?}");
    assert!(r.p99_ms >= r.median_ms && r.max_ms >= r.p99_ms, "{r:?}");

    let mib = 16;
    let bulk = run(NdcTest::Bulk {
        mib,
        msg_size: 16384,
    })
    .await;
    let NdcFigures::Bulk(b) = bulk.figures else {
        panic!("bulk gave {:?}", bulk.figures)
    };
    let total = u64::from(mib) << 20;
    assert_eq!(b.bytes_sent, total, "{b:?}");
    assert_eq!(b.bytes_received, total, "every byte arrived: {b:?}");
    assert!(b.secs > 0.0 && b.mb_per_s > 0.0, "{b:?}");

    let unreliable = run(NdcTest::Unreliable {
        count: 500,
        interval_ms: 2,
        size: 200,
    })
    .await;
    let NdcFigures::Unreliable(u) = unreliable.figures else {
        panic!("unreliable gave {:?}", unreliable.figures)
    };
    assert_eq!((u.sent, u.size), (500, 200), "{u:?}");
    // Unreliable: some may be lost (no speed or loss figure is asserted).
    assert!(
        u.delivered > 0 && u.delivered <= u.sent,
        "delivered {} of {}",
        u.delivered,
        u.sent
    );
    let (p50, p99) = (u.p50_ms.expect("p50"), u.p99_ms.expect("p99"));
    assert!(p50 >= 0.0 && p99 >= p50, "{u:?}");
}
