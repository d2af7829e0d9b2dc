//! One retry schedule for every bucket request, OpenDAL's and the direct S3 calls'.
//!
//! The first retry comes soon: most failures a retry cures are over at once (a reset
//! connection, a server's internal error on one request), and a request that waits a
//! second for it stalls whatever waits on that request: a close, a batch of deletes. Each
//! later pause is three times the one before, so the default 4 retries still span about
//! 10 s (up to twice that with jitter) for a bucket that is briefly away.

use std::time::Duration;

use opendal::layers::RetryLayer;

/// The pause before the first retry.
const FIRST_PAUSE: Duration = Duration::from_millis(250);
/// Each pause is this many times the one before.
const FACTOR: u32 = 3;
/// No pause is longer than this.
const MAX_PAUSE: Duration = Duration::from_secs(60);

/// OpenDAL's retry layer on this schedule, with jitter (up to the pause again) so that
/// requests failing together do not all come back together.
pub fn layer(retries: usize) -> RetryLayer {
    RetryLayer::new()
        .with_jitter()
        .with_min_delay(FIRST_PAUSE)
        .with_factor(FACTOR as f32)
        .with_max_delay(MAX_PAUSE)
        .with_max_times(retries)
}

/// The pause before retry number `retry` (1 for the first), without jitter: the direct
/// S3 calls' schedule, a handful of requests that never fail together in numbers.
pub fn pause_before(retry: usize) -> Duration {
    let exponent = u32::try_from(retry.saturating_sub(1)).unwrap_or(u32::MAX);
    let growth = FACTOR.saturating_pow(exponent);
    FIRST_PAUSE.saturating_mul(growth).min(MAX_PAUSE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_threefold_from_a_quarter_second_and_stop_at_a_minute() {
        let pauses: Vec<u128> = (1..=7).map(|n| pause_before(n).as_millis()).collect();
        assert_eq!(pauses, [250, 750, 2250, 6750, 20250, 60000, 60000]);
        assert_eq!(pause_before(usize::MAX), MAX_PAUSE);
    }
}
