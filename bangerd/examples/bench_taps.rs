//! TAP acquire time with and without the pool, in a throw-away network
//! namespace. Run with `scripts/bench-network` (needs root).

use std::time::{Duration, Instant};

use bangerd::net::leases::Subnet;
use bangerd::net::link::Links;
use bangerd::net::pool::TapPool;

fn stats(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let pick = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    println!(
        "{label:<28} n={:<3} median {:>8.3} ms   p90 {:>8.3} ms   max {:>8.3} ms",
        samples.len(),
        pick(0.5).as_secs_f64() * 1e3,
        pick(0.9).as_secs_f64() * 1e3,
        pick(1.0).as_secs_f64() * 1e3,
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(30);
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let links = Links::connect()?;
        let bridge = links
            .ensure_bridge("bench0", &Subnet::parse("10.213.42.0/24")?)
            .await?;

        // Without a pool: every VM pays for TUNSETIFF + attach + up.
        let mut cold = Vec::new();
        for i in 0..rounds {
            let name = format!("bgtap{i}");
            let t = Instant::now();
            links.create_tap(&name, 54_321, bridge).await?;
            cold.push(t.elapsed());
        }
        for i in 0..rounds {
            links.delete(&format!("bgtap{i}")).await?;
        }

        // With a pool kept as large as the burst: acquire only re-owns.
        let pool = TapPool::new(links.clone(), bridge, rounds);
        pool.adopt(&[]).await?;
        let mut warm = Vec::new();
        for _ in 0..rounds {
            let t = Instant::now();
            pool.acquire(54_321).await?;
            warm.push(t.elapsed());
        }
        stats("acquire without pool", cold);
        stats("acquire from pool", warm);
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}
