//! Outlier detection (Envoy's consecutive-error kinds): each upstream result is reported per
//! endpoint; a run of 5xx, of gateway errors (502/503/504) or of local-origin failures
//! (connect errors, resets, timeouts) ejects the endpoint for `base_ejection_time` × the number
//! of times it was ejected (capped by `max_ejection_time`), within `max_ejection_percent` of the
//! cluster (at least one host, as Envoy). The multiplier goes down by one for each `interval`
//! the host spends back in service.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::cluster::v3 as cluster_pb;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub consecutive_5xx: u32,
    pub enforcing_consecutive_5xx: u32,
    pub consecutive_gateway_failure: u32,
    pub enforcing_consecutive_gateway_failure: u32,
    pub split_external_local_origin_errors: bool,
    pub consecutive_local_origin_failure: u32,
    pub enforcing_consecutive_local_origin_failure: u32,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
}

impl Default for Config {
    /// Envoy's defaults.
    fn default() -> Self {
        Config {
            consecutive_5xx: 5,
            enforcing_consecutive_5xx: 100,
            consecutive_gateway_failure: 5,
            enforcing_consecutive_gateway_failure: 0,
            split_external_local_origin_errors: false,
            consecutive_local_origin_failure: 5,
            enforcing_consecutive_local_origin_failure: 100,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
        }
    }
}

fn dur(
    d: &Option<envoy_types::pb::google::protobuf::Duration>,
    field: &str,
    default: Duration,
) -> Result<Duration, String> {
    match d {
        None => Ok(default),
        Some(d) => crate::config::proto_duration(d)
            .map_err(|_| format!("outlier_detection.{field}: negative")),
    }
}

/// The cluster's `outlier_detection`, `None` when absent (no detection at all).
pub fn config(c: &cluster_pb::Cluster) -> Result<Option<Config>, String> {
    let Some(o) = &c.outlier_detection else {
        return Ok(None);
    };
    let d = Config::default();
    let v = |x: &Option<envoy_types::pb::google::protobuf::UInt32Value>, default: u32| {
        x.as_ref().map_or(default, |x| x.value)
    };
    let pct =
        |x: &Option<envoy_types::pb::google::protobuf::UInt32Value>, default: u32, field: &str| {
            let p = v(x, default);
            if p > 100 {
                Err(format!(
                    "outlier_detection.{field}: {p} is not a percentage"
                ))
            } else {
                Ok(p)
            }
        };
    let base = dur(
        &o.base_ejection_time,
        "base_ejection_time",
        d.base_ejection_time,
    )?;
    let mut max = dur(
        &o.max_ejection_time,
        "max_ejection_time",
        d.max_ejection_time,
    )?;
    // Envoy: a base above the maximum raises the maximum to it.
    max = max.max(base);
    let interval = dur(&o.interval, "interval", d.interval)?;
    if interval.is_zero() {
        return Err("outlier_detection.interval: must be above 0".into());
    }
    Ok(Some(Config {
        consecutive_5xx: v(&o.consecutive_5xx, d.consecutive_5xx),
        enforcing_consecutive_5xx: pct(
            &o.enforcing_consecutive_5xx,
            100,
            "enforcing_consecutive_5xx",
        )?,
        consecutive_gateway_failure: v(
            &o.consecutive_gateway_failure,
            d.consecutive_gateway_failure,
        ),
        enforcing_consecutive_gateway_failure: pct(
            &o.enforcing_consecutive_gateway_failure,
            0,
            "enforcing_consecutive_gateway_failure",
        )?,
        split_external_local_origin_errors: o.split_external_local_origin_errors,
        consecutive_local_origin_failure: v(
            &o.consecutive_local_origin_failure,
            d.consecutive_local_origin_failure,
        ),
        enforcing_consecutive_local_origin_failure: pct(
            &o.enforcing_consecutive_local_origin_failure,
            100,
            "enforcing_consecutive_local_origin_failure",
        )?,
        interval,
        base_ejection_time: base,
        max_ejection_time: max,
        max_ejection_percent: pct(
            &o.max_ejection_percent,
            d.max_ejection_percent,
            "max_ejection_percent",
        )?,
    }))
}

/// What one upstream attempt came to, as outlier detection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered with this status.
    Status(u16),
    /// Connect failure, reset, or timeout before an answer (Envoy's local-origin errors;
    /// without the split they count as a 503, a timeout as a 504).
    LocalFailure { timeout: bool },
}

/// Why a host was ejected (for metrics and the admin page).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Consecutive5xx,
    ConsecutiveGatewayFailure,
    ConsecutiveLocalOriginFailure,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Consecutive5xx => "consecutive_5xx",
            Kind::ConsecutiveGatewayFailure => "consecutive_gateway_failure",
            Kind::ConsecutiveLocalOriginFailure => "consecutive_local_origin_failure",
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct HostState {
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    pub consecutive_local: u32,
    /// Ejections so far, less one per interval spent in service since (Envoy's multiplier).
    pub multiplier: u32,
    pub ejected_until: Option<Instant>,
    /// When it came back (for the multiplier's decay).
    pub back_since: Option<Instant>,
    pub ejections: u64,
}

/// The per-endpoint part, behind a lock (held only for counter updates, never across I/O).
#[derive(Debug, Default)]
pub struct Host(pub Mutex<HostState>);

impl Host {
    /// Whether the host is out of service at `now`; an ejection whose time has passed ends here
    /// (returns `Some(false)` once, so the caller can count it).
    pub fn ejected(&self, now: Instant) -> (bool, bool) {
        let Ok(mut s) = self.0.lock() else {
            return (false, false);
        };
        match s.ejected_until {
            Some(t) if now < t => (true, false),
            Some(_) => {
                s.ejected_until = None;
                s.back_since = Some(now);
                (false, true)
            }
            None => (false, false),
        }
    }

    pub fn snapshot(&self) -> HostState {
        self.0.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Count one result for `host`; returns the kind of ejection it calls for (the caller checks
/// the cluster-wide cap, then calls [`eject`]).
pub fn record(config: &Config, host: &Host, outcome: Outcome) -> Option<Kind> {
    let Ok(mut s) = host.0.lock() else {
        return None;
    };
    if s.ejected_until.is_some() {
        return None;
    }
    // Without the split, a local failure counts as the 503 (504 for a timeout) Envoy answers.
    let status = match outcome {
        Outcome::Status(code) => Some(code),
        Outcome::LocalFailure { timeout } if !config.split_external_local_origin_errors => {
            Some(if timeout { 504 } else { 503 })
        }
        Outcome::LocalFailure { .. } => None,
    };
    match status {
        None => {
            s.consecutive_local += 1;
            if config.consecutive_local_origin_failure > 0
                && s.consecutive_local >= config.consecutive_local_origin_failure
                && enforced(config.enforcing_consecutive_local_origin_failure)
            {
                return Some(Kind::ConsecutiveLocalOriginFailure);
            }
            None
        }
        Some(code) => {
            if config.split_external_local_origin_errors {
                // A response means the connection worked.
                s.consecutive_local = 0;
            }
            if code >= 500 {
                s.consecutive_5xx += 1;
            } else {
                s.consecutive_5xx = 0;
            }
            if matches!(code, 502..=504) {
                s.consecutive_gateway += 1;
            } else {
                s.consecutive_gateway = 0;
            }
            if config.consecutive_gateway_failure > 0
                && s.consecutive_gateway >= config.consecutive_gateway_failure
                && enforced(config.enforcing_consecutive_gateway_failure)
            {
                return Some(Kind::ConsecutiveGatewayFailure);
            }
            if config.consecutive_5xx > 0
                && s.consecutive_5xx >= config.consecutive_5xx
                && enforced(config.enforcing_consecutive_5xx)
            {
                return Some(Kind::Consecutive5xx);
            }
            None
        }
    }
}

fn enforced(percent: u32) -> bool {
    percent >= 100 || (percent > 0 && fastrand::u32(0..100) < percent)
}

/// Whether one more ejection fits: below `max_ejection_percent` of `total`, or none ejected
/// yet (Envoy always allows one).
pub fn may_eject(config: &Config, ejected: usize, total: usize) -> bool {
    ejected == 0 || (ejected + 1) * 100 <= total * config.max_ejection_percent as usize
}

/// Take `host` out of service; returns how long.
pub fn eject(config: &Config, host: &Host, now: Instant) -> Duration {
    let Ok(mut s) = host.0.lock() else {
        return Duration::ZERO;
    };
    // The multiplier decays by one per interval in service since the last ejection.
    if let Some(back) = s.back_since {
        let intervals =
            now.saturating_duration_since(back).as_nanos() / config.interval.as_nanos().max(1);
        s.multiplier = s
            .multiplier
            .saturating_sub(u32::try_from(intervals).unwrap_or(u32::MAX));
    }
    s.multiplier += 1;
    let time = config
        .base_ejection_time
        .saturating_mul(s.multiplier)
        .min(config.max_ejection_time);
    s.ejected_until = Some(now + time);
    s.back_since = None;
    s.consecutive_5xx = 0;
    s.consecutive_gateway = 0;
    s.consecutive_local = 0;
    s.ejections += 1;
    time
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config {
            consecutive_5xx: 3,
            base_ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(25),
            interval: Duration::from_secs(1),
            max_ejection_percent: 50,
            ..Config::default()
        }
    }

    #[test]
    fn consecutive_5xx_ejects_and_success_resets() {
        let c = cfg();
        let h = Host::default();
        assert_eq!(record(&c, &h, Outcome::Status(500)), None);
        assert_eq!(record(&c, &h, Outcome::Status(500)), None);
        assert_eq!(
            record(&c, &h, Outcome::Status(200)),
            None,
            "a success resets"
        );
        assert_eq!(record(&c, &h, Outcome::Status(500)), None);
        assert_eq!(record(&c, &h, Outcome::Status(503)), None);
        assert_eq!(
            record(&c, &h, Outcome::Status(500)),
            Some(Kind::Consecutive5xx)
        );
    }

    #[test]
    fn ejection_time_grows_with_repeated_ejections_and_decays() {
        let c = cfg();
        let h = Host::default();
        let t0 = Instant::now();
        assert_eq!(eject(&c, &h, t0), Duration::from_secs(10));
        assert_eq!(h.ejected(t0 + Duration::from_secs(9)), (true, false));
        assert_eq!(
            h.ejected(t0 + Duration::from_secs(10)),
            (false, true),
            "back, once"
        );
        assert_eq!(h.ejected(t0 + Duration::from_secs(10)), (false, false));
        // Ejected again right away: twice the base.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(eject(&c, &h, t1), Duration::from_secs(20));
        h.ejected(t1 + Duration::from_secs(20));
        // Third time: capped at max_ejection_time.
        let t2 = t1 + Duration::from_secs(20);
        assert_eq!(eject(&c, &h, t2), Duration::from_secs(25));
        h.ejected(t2 + Duration::from_secs(25));
        // Long in service (30 intervals): the multiplier is back to 0, so the base again.
        let t3 = t2 + Duration::from_secs(25 + 30);
        assert_eq!(eject(&c, &h, t3), Duration::from_secs(10));
        assert_eq!(h.snapshot().ejections, 4);
    }

    #[test]
    fn gateway_errors_enforced_only_when_asked() {
        let mut c = cfg();
        c.consecutive_5xx = 0;
        c.consecutive_gateway_failure = 2;
        let h = Host::default();
        // Envoy's default enforcement of gateway failures is 0%.
        assert_eq!(record(&c, &h, Outcome::Status(502)), None);
        assert_eq!(record(&c, &h, Outcome::Status(502)), None);
        c.enforcing_consecutive_gateway_failure = 100;
        let h = Host::default();
        assert_eq!(
            record(&c, &h, Outcome::Status(500)),
            None,
            "500 is not a gateway error"
        );
        assert_eq!(record(&c, &h, Outcome::Status(504)), None);
        assert_eq!(
            record(&c, &h, Outcome::LocalFailure { timeout: false }),
            Some(Kind::ConsecutiveGatewayFailure),
            "a connect failure counts as 503"
        );
    }

    #[test]
    fn local_origin_failures_split() {
        let mut c = cfg();
        c.split_external_local_origin_errors = true;
        c.consecutive_local_origin_failure = 2;
        let h = Host::default();
        assert_eq!(
            record(&c, &h, Outcome::LocalFailure { timeout: true }),
            None
        );
        assert_eq!(
            record(&c, &h, Outcome::Status(500)),
            None,
            "a response resets the local count"
        );
        assert_eq!(
            record(&c, &h, Outcome::LocalFailure { timeout: false }),
            None
        );
        assert_eq!(
            record(&c, &h, Outcome::LocalFailure { timeout: false }),
            Some(Kind::ConsecutiveLocalOriginFailure)
        );
        assert_eq!(
            h.snapshot().consecutive_5xx,
            1,
            "local failures are not 5xx when split"
        );
    }

    #[test]
    fn ejection_cap() {
        let c = cfg();
        assert!(may_eject(&c, 0, 2), "one always");
        assert!(!may_eject(&c, 1, 2), "50% of 2 is 1");
        assert!(may_eject(&c, 1, 4));
        assert!(!may_eject(&c, 2, 4));
        let ten = Config::default();
        assert!(may_eject(&ten, 0, 3), "Envoy's 10% still ejects one");
        assert!(!may_eject(&ten, 1, 3));
    }

    #[test]
    fn config_defaults_and_errors() {
        let mut c = cluster_pb::Cluster::default();
        assert_eq!(config(&c).unwrap(), None);
        c.outlier_detection = Some(Default::default());
        assert_eq!(config(&c).unwrap(), Some(Config::default()));
        c.outlier_detection = Some(cluster_pb::OutlierDetection {
            max_ejection_percent: Some(envoy_types::pb::google::protobuf::UInt32Value {
                value: 101,
            }),
            ..Default::default()
        });
        assert!(config(&c).unwrap_err().contains("max_ejection_percent"));
    }
}
