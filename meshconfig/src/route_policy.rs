//! Resilience and CORS policy of a VirtualService HTTP rule in Envoy's terms, as Istio
//! translates them: `retries` → `RouteAction.retry_policy` (Istio's mesh default when the rule
//! says nothing), `fault` → `envoy.filters.http.fault` per-route config, `corsPolicy` →
//! `envoy.filters.http.cors` per-route config, `mirror(s)` → `request_mirror_policies`, and the
//! connection manager's HTTP filters that read those per-route configs.

use std::collections::HashMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::common::fault::v3 as common_fault;
use envoy_types::pb::envoy::extensions::filters::http::cors::v3 as cors;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3 as fault;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;
use envoy_types::pb::envoy::extensions::retry::priority::previous_priorities::v3::PreviousPrioritiesConfig;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::envoy::r#type::v3 as types;
use envoy_types::pb::google::protobuf as pbw;
use envoy_types::util::pack_any;

use crate::routing::{AbortStatus, CorsPolicy, Fault, HttpRoute, Retries, StringMatch};

pub const CORS_FILTER: &str = "envoy.filters.http.cors";
pub const FAULT_FILTER: &str = "envoy.filters.http.fault";
const PREVIOUS_HOSTS: &str = "envoy.retry_host_predicates.previous_hosts";
const PREVIOUS_PRIORITIES: &str = "envoy.retry_priorities.previous_priorities";

/// Istio's default `retry_on` (with 503 as the retriable status code).
pub const DEFAULT_RETRY_ON: &str =
    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";

/// Retries of Istio's mesh default.
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 2;

fn duration(d: Duration) -> pbw::Duration {
    pbw::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// Istio's mesh default: 2 retries on connect failures, refused streams, gRPC `unavailable` /
/// `cancelled` and 503, preferring hosts not tried yet (5 picks at most).
fn default_policy(hash: bool) -> route::RetryPolicy {
    route::RetryPolicy {
        num_retries: Some(pbw::UInt32Value {
            value: DEFAULT_RETRY_ATTEMPTS,
        }),
        retry_on: DEFAULT_RETRY_ON.into(),
        retriable_status_codes: vec![503],
        host_selection_retry_max_attempts: 5,
        retry_host_predicate: if hash {
            // A consistent-hash route keeps its host on retries (Istio).
            vec![]
        } else {
            vec![previous_hosts()]
        },
        ..Default::default()
    }
}

fn previous_hosts() -> route::retry_policy::RetryHostPredicate {
    route::retry_policy::RetryHostPredicate {
        name: PREVIOUS_HOSTS.into(),
        config_type: Some(
            route::retry_policy::retry_host_predicate::ConfigType::TypedConfig(pack_any(
                PreviousHostsPredicate {},
            )),
        ),
    }
}

/// `retryOn` split as Istio does: integers that are HTTP status codes become
/// `retriable_status_codes` (and `retriable-status-codes` is added to the conditions).
fn parse_retry_on(text: &str) -> (String, Vec<u32>) {
    let mut conditions: Vec<&str> = Vec::new();
    let mut codes = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.parse::<u32>() {
            Ok(c) if (100..=599).contains(&c) => codes.push(c),
            _ => conditions.push(part),
        }
    }
    let mut on = conditions.join(",");
    if !codes.is_empty() && !conditions.contains(&"retriable-status-codes") {
        if !on.is_empty() {
            on.push(',');
        }
        on.push_str("retriable-status-codes");
    }
    (on, codes)
}

/// The route's retry policy: Istio's default when `retries` is absent, none for `attempts: 0`,
/// else the default with the rule's fields over it. `hash`: the route has a consistent-hash
/// policy (no previous-hosts predicate then, as Istio).
pub fn retry_policy(r: Option<&Retries>, hash: bool) -> Option<route::RetryPolicy> {
    let mut out = default_policy(hash);
    let Some(r) = r else {
        return Some(out);
    };
    if r.attempts == 0 {
        return None;
    }
    out.num_retries = Some(pbw::UInt32Value { value: r.attempts });
    if let Some(on) = r.retry_on.as_deref().filter(|s| !s.trim().is_empty()) {
        (out.retry_on, out.retriable_status_codes) = parse_retry_on(on);
    }
    out.per_try_timeout = r.per_try_timeout.map(duration);
    if let Some(ignore) = r.retry_ignore_previous_hosts {
        out.retry_host_predicate = if ignore {
            vec![previous_hosts()]
        } else {
            vec![]
        };
    }
    if r.retry_remote_localities == Some(true) {
        out.retry_priority = Some(route::retry_policy::RetryPriority {
            name: PREVIOUS_PRIORITIES.into(),
            config_type: Some(
                route::retry_policy::retry_priority::ConfigType::TypedConfig(pack_any(
                    PreviousPrioritiesConfig {
                        update_frequency: 2,
                    },
                )),
            ),
        });
    }
    if let Some(b) = r.backoff {
        out.retry_back_off = Some(route::retry_policy::RetryBackOff {
            base_interval: Some(duration(b)),
            max_interval: None,
        });
    }
    Some(out)
}

fn per_million(n: u32) -> types::FractionalPercent {
    types::FractionalPercent {
        numerator: n,
        denominator: types::fractional_percent::DenominatorType::Million as i32,
    }
}

/// Istio's `HTTPFaultInjection` as Envoy's `HTTPFault`.
pub fn http_fault(f: &Fault) -> fault::HttpFault {
    fault::HttpFault {
        delay: f.delay.as_ref().map(|d| common_fault::FaultDelay {
            percentage: Some(per_million(d.per_million)),
            fault_delay_secifier: Some(common_fault::fault_delay::FaultDelaySecifier::FixedDelay(
                duration(d.fixed_delay),
            )),
        }),
        abort: f.abort.as_ref().map(|a| fault::FaultAbort {
            percentage: Some(per_million(a.per_million)),
            error_type: Some(match a.status {
                AbortStatus::Http(s) => fault::fault_abort::ErrorType::HttpStatus(s),
                AbortStatus::Grpc(s) => fault::fault_abort::ErrorType::GrpcStatus(s),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn string_matcher(m: &StringMatch) -> Option<matcher::StringMatcher> {
    use matcher::string_matcher::MatchPattern;
    let p = match m {
        StringMatch::Exact(v) => MatchPattern::Exact(v.clone()),
        StringMatch::Prefix(v) => MatchPattern::Prefix(v.clone()),
        StringMatch::Regex(v) => MatchPattern::SafeRegex(matcher::RegexMatcher {
            regex: v.clone(),
            engine_type: None,
        }),
        StringMatch::Present => return None,
    };
    Some(matcher::StringMatcher {
        ignore_case: false,
        match_pattern: Some(p),
    })
}

/// Istio's `CorsPolicy` as the CORS filter's per-route config (enabled for every request).
pub fn cors_policy(c: &CorsPolicy) -> cors::CorsPolicy {
    cors::CorsPolicy {
        allow_origin_string_match: c.allow_origins.iter().filter_map(string_matcher).collect(),
        allow_methods: c.allow_methods.join(","),
        allow_headers: c.allow_headers.join(","),
        expose_headers: c.expose_headers.join(","),
        max_age: c
            .max_age
            .map(|d| d.as_secs().to_string())
            .unwrap_or_default(),
        allow_credentials: c.allow_credentials.map(|value| pbw::BoolValue { value }),
        filter_enabled: Some(core::RuntimeFractionalPercent {
            default_value: Some(types::FractionalPercent {
                numerator: 100,
                denominator: types::fractional_percent::DenominatorType::Hundred as i32,
            }),
            runtime_key: String::new(),
        }),
        forward_not_matching_preflights: Some(pbw::BoolValue {
            value: !c.ignore_unmatched_preflights,
        }),
        ..Default::default()
    }
}

/// The route's `typed_per_filter_config`: fault and CORS, when the rule has them.
pub fn per_filter_config(r: &HttpRoute) -> HashMap<String, pbw::Any> {
    let mut out = HashMap::new();
    if let Some(f) = &r.fault {
        out.insert(FAULT_FILTER.to_string(), pack_any(http_fault(f)));
    }
    if let Some(c) = &r.cors_policy {
        out.insert(CORS_FILTER.to_string(), pack_any(cors_policy(c)));
    }
    out
}

/// One mirror: `cluster` gets a copy of `per_million` of the requests (`None` for 0%, which
/// Istio leaves out).
pub fn mirror_policy(
    cluster: String,
    per_million_share: u32,
) -> Option<route::route_action::RequestMirrorPolicy> {
    (per_million_share > 0).then(|| route::route_action::RequestMirrorPolicy {
        cluster,
        runtime_fraction: Some(core::RuntimeFractionalPercent {
            default_value: Some(per_million(per_million_share)),
            runtime_key: String::new(),
        }),
        trace_sampled: Some(pbw::BoolValue { value: false }),
        ..Default::default()
    })
}

/// The HTTP filters before the router, in Istio's order: CORS, then fault (both empty at the
/// connection manager; routes carry their configs).
pub fn http_filters() -> Vec<hcm::HttpFilter> {
    vec![
        hcm::HttpFilter {
            name: CORS_FILTER.into(),
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(pack_any(
                cors::Cors {},
            ))),
            ..Default::default()
        },
        hcm::HttpFilter {
            name: FAULT_FILTER.into(),
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(pack_any(
                fault::HttpFault::default(),
            ))),
            ..Default::default()
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{FaultAbort, FaultDelay};

    #[test]
    fn default_retry_policy_is_istios() {
        let p = retry_policy(None, false).unwrap();
        assert_eq!(p.num_retries, Some(pbw::UInt32Value { value: 2 }));
        assert_eq!(
            p.retry_on,
            "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
        );
        assert_eq!(p.retriable_status_codes, [503]);
        assert_eq!(p.host_selection_retry_max_attempts, 5);
        assert_eq!(p.retry_host_predicate.len(), 1);
        assert_eq!(p.retry_host_predicate[0].name, PREVIOUS_HOSTS);
        assert!(p.per_try_timeout.is_none() && p.retry_back_off.is_none());
        assert!(
            retry_policy(None, true)
                .unwrap()
                .retry_host_predicate
                .is_empty(),
            "consistent hash keeps its host"
        );
    }

    #[test]
    fn retries_over_the_default() {
        assert_eq!(
            retry_policy(
                Some(&Retries {
                    attempts: 0,
                    ..Default::default()
                }),
                false
            ),
            None,
            "attempts 0: no retries at all"
        );
        let r = Retries {
            attempts: 4,
            per_try_timeout: Some(Duration::from_millis(250)),
            retry_on: Some("5xx, 409,reset,unavailable".into()),
            retry_remote_localities: Some(true),
            retry_ignore_previous_hosts: Some(false),
            backoff: Some(Duration::from_millis(10)),
        };
        let p = retry_policy(Some(&r), false).unwrap();
        assert_eq!(p.num_retries, Some(pbw::UInt32Value { value: 4 }));
        assert_eq!(p.retry_on, "5xx,reset,unavailable,retriable-status-codes");
        assert_eq!(p.retriable_status_codes, [409]);
        assert_eq!(
            p.per_try_timeout,
            Some(duration(Duration::from_millis(250)))
        );
        assert!(p.retry_host_predicate.is_empty());
        assert_eq!(p.retry_priority.unwrap().name, PREVIOUS_PRIORITIES);
        assert_eq!(
            p.retry_back_off.unwrap().base_interval,
            Some(duration(Duration::from_millis(10)))
        );
        // Only the attempts: the default conditions stay.
        let p = retry_policy(
            Some(&Retries {
                attempts: 1,
                ..Default::default()
            }),
            false,
        )
        .unwrap();
        assert_eq!(p.retry_on, DEFAULT_RETRY_ON);
        assert_eq!(p.retriable_status_codes, [503]);
        assert_eq!(p.retry_host_predicate.len(), 1);
        assert_eq!(
            parse_retry_on("retriable-status-codes,500"),
            ("retriable-status-codes".into(), vec![500])
        );
    }

    #[test]
    fn fault_and_cors_configs() {
        let f = Fault {
            delay: Some(FaultDelay {
                fixed_delay: Duration::from_millis(1500),
                per_million: 500_000,
            }),
            abort: Some(FaultAbort {
                status: AbortStatus::Grpc(14),
                per_million: 1_000_000,
            }),
        };
        let h = http_fault(&f);
        let d = h.delay.unwrap();
        assert_eq!(d.percentage, Some(per_million(500_000)));
        assert_eq!(
            d.fault_delay_secifier,
            Some(common_fault::fault_delay::FaultDelaySecifier::FixedDelay(
                pbw::Duration {
                    seconds: 1,
                    nanos: 500_000_000
                }
            ))
        );
        assert_eq!(
            h.abort.unwrap().error_type,
            Some(fault::fault_abort::ErrorType::GrpcStatus(14))
        );
        let c = cors_policy(&CorsPolicy {
            allow_origins: vec![
                StringMatch::Exact("https://a.example".into()),
                StringMatch::Regex(".*\\.b\\.example".into()),
            ],
            allow_methods: vec!["GET".into(), "POST".into()],
            allow_headers: vec!["x-a".into(), "x-b".into()],
            expose_headers: vec!["x-c".into()],
            max_age: Some(Duration::from_secs(86400)),
            allow_credentials: Some(true),
            ignore_unmatched_preflights: true,
        });
        assert_eq!(c.allow_origin_string_match.len(), 2);
        assert_eq!(c.allow_methods, "GET,POST");
        assert_eq!(c.allow_headers, "x-a,x-b");
        assert_eq!(c.expose_headers, "x-c");
        assert_eq!(c.max_age, "86400");
        assert_eq!(c.allow_credentials, Some(pbw::BoolValue { value: true }));
        assert_eq!(
            c.forward_not_matching_preflights,
            Some(pbw::BoolValue { value: false })
        );
        let m = mirror_policy("c".into(), 250_000).unwrap();
        assert_eq!(
            m.runtime_fraction.unwrap().default_value,
            Some(per_million(250_000))
        );
        assert!(mirror_policy("c".into(), 0).is_none());
        let names: Vec<String> = http_filters().into_iter().map(|f| f.name).collect();
        assert_eq!(names, [CORS_FILTER, FAULT_FILTER]);
    }
}
