//! Backend choice, sans-IO: power of two choices over in-flight requests.
//!
//! P2C gets close to least-loaded without scanning every backend and without the herd effect of
//! "always the least loaded" when many edges see the same stale counts (linkerd, Envoy, HAProxy).

use rand::Rng;

/// Picks an index in `0..n` by P2C: two distinct random candidates, the one with fewer in-flight
/// requests wins (the first drawn on a tie). `None` when `n == 0`.
pub(crate) fn p2c<R: Rng + ?Sized>(
    n: usize,
    in_flight: impl Fn(usize) -> usize,
    rng: &mut R,
) -> Option<usize> {
    match n {
        0 => None,
        1 => Some(0),
        _ => {
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            Some(choose(a, b, &in_flight))
        }
    }
}

/// The less loaded of two candidates; `a` on a tie.
fn choose(a: usize, b: usize, in_flight: impl Fn(usize) -> usize) -> usize {
    if in_flight(b) < in_flight(a) { b } else { a }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn empty_and_single() {
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(p2c(0, |_| 0, &mut rng), None);
        assert_eq!(p2c(1, |_| 99, &mut rng), Some(0));
    }

    #[test]
    fn two_backends_always_prefers_fewer_in_flight() {
        let mut rng = StdRng::seed_from_u64(7);
        let loads = [5usize, 1];
        for _ in 0..1000 {
            assert_eq!(p2c(2, |i| loads[i], &mut rng), Some(1));
        }
    }

    #[test]
    fn never_picks_the_most_loaded_of_many() {
        let mut rng = StdRng::seed_from_u64(42);
        let loads = [3usize, 0, 7, 2, 100];
        let mut counts = [0usize; 5];
        for _ in 0..10_000 {
            let i = p2c(loads.len(), |i| loads[i], &mut rng).unwrap_or(usize::MAX);
            counts[i] += 1;
        }
        assert_eq!(counts[4], 0, "the most loaded backend can never win a pair");
        // The idle backend wins every pair it is drawn into: 2/5 of draws.
        assert!(counts[1] > 3_500, "{counts:?}");
        assert!(counts[1] > counts[0] && counts[0] > counts[2], "{counts:?}");
    }

    #[test]
    fn equal_load_spreads() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut counts = [0usize; 4];
        for _ in 0..8_000 {
            let i = p2c(4, |_| 0, &mut rng).unwrap_or(usize::MAX);
            counts[i] += 1;
        }
        assert!(counts.iter().all(|&c| c > 1_500), "{counts:?}");
    }
}
