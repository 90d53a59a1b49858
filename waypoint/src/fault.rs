//! Fault injection as Envoy's `envoy.filters.http.fault` does it from an `HTTPFault` (the
//! route's per-filter config, else the filter's own): a fixed delay for a share of requests
//! (response flag `DI`), then an abort for a share (flag `FI`), answered by the proxy with the
//! HTTP status, or for a gRPC abort `200` with the gRPC status (trailers-only for a gRPC
//! request), body `fault filter abort`.

use std::time::Duration;

use envoy_types::pb::envoy::extensions::filters::common::fault::v3 as common;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3 as pb;
use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
use prost::Message;

use crate::mirror::fraction_per_million;

pub const TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";
/// Envoy's body of an injected abort.
pub const ABORT_BODY: &str = "fault filter abort";

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fault {
    pub delay: Option<(Duration, u32)>,
    pub abort: Option<(Abort, u32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    Http(u16),
    Grpc(u32),
}

/// What the filter decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Decision {
    pub delay: Option<Duration>,
    pub abort: Option<Abort>,
}

fn share(p: Option<&FractionalPercent>) -> u32 {
    // Envoy: an unset percentage is 0 (nothing injected).
    p.map_or(0, |p| fraction_per_million(p.numerator, p.denominator))
}

impl Fault {
    /// Compile an `HTTPFault` (`any.value`); `None` when it injects nothing.
    pub fn decode(body: &[u8]) -> Result<Option<Fault>, String> {
        let f = pb::HttpFault::decode(body).map_err(|e| format!("undecodable HTTPFault: {e}"))?;
        Fault::compile(&f)
    }

    pub fn compile(f: &pb::HttpFault) -> Result<Option<Fault>, String> {
        let unsupported = [
            (!f.upstream_cluster.is_empty(), "upstream_cluster"),
            (!f.headers.is_empty(), "headers"),
            (!f.downstream_nodes.is_empty(), "downstream_nodes"),
            (f.response_rate_limit.is_some(), "response_rate_limit"),
        ];
        if let Some((_, field)) = unsupported.iter().find(|(set, _)| *set) {
            return Err(format!("{field}: not supported"));
        }
        let delay = match &f.delay {
            None => None,
            Some(d) => match &d.fault_delay_secifier {
                Some(common::fault_delay::FaultDelaySecifier::FixedDelay(t)) => Some((
                    Duration::new(
                        u64::try_from(t.seconds).map_err(|_| "delay.fixed_delay: negative")?,
                        u32::try_from(t.nanos).map_err(|_| "delay.fixed_delay: negative")?,
                    ),
                    share(d.percentage.as_ref()),
                )),
                Some(common::fault_delay::FaultDelaySecifier::HeaderDelay(_)) => {
                    return Err("delay.header_delay: not supported".into());
                }
                None => return Err("delay: fixed_delay required".into()),
            },
        };
        let abort = match &f.abort {
            None => None,
            Some(a) => {
                let status = match a.error_type {
                    Some(pb::fault_abort::ErrorType::HttpStatus(s)) => Abort::Http(
                        u16::try_from(s)
                            .ok()
                            .filter(|s| (200..600).contains(s))
                            .ok_or_else(|| {
                                format!("abort.http_status: {s} is not in [200, 600)")
                            })?,
                    ),
                    Some(pb::fault_abort::ErrorType::GrpcStatus(s)) => Abort::Grpc(s),
                    Some(pb::fault_abort::ErrorType::HeaderAbort(_)) => {
                        return Err("abort.header_abort: not supported".into());
                    }
                    None => return Err("abort: http_status or grpc_status required".into()),
                };
                Some((status, share(a.percentage.as_ref())))
            }
        };
        Ok((delay.is_some() || abort.is_some()).then_some(Fault { delay, abort }))
    }

    /// The faults for one request, from two independent draws in [0, 1 000 000).
    pub fn decide(&self, delay_draw: u32, abort_draw: u32) -> Decision {
        Decision {
            delay: self
                .delay
                .filter(|(d, share)| delay_draw < *share && !d.is_zero())
                .map(|(d, _)| d),
            abort: self
                .abort
                .filter(|(_, share)| abort_draw < *share)
                .map(|(a, _)| a),
        }
    }
}

/// Envoy's mapping of an HTTP status to the gRPC status of a local reply to a gRPC request.
pub fn grpc_status_of(http: u16) -> u32 {
    match http {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => 14,
        _ => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType;
    use envoy_types::pb::google::protobuf::Duration as PbDuration;

    fn pct(n: u32) -> Option<FractionalPercent> {
        Some(FractionalPercent {
            numerator: n,
            denominator: DenominatorType::Million as i32,
        })
    }

    #[test]
    fn decodes_and_decides() {
        let f = Fault::compile(&pb::HttpFault {
            delay: Some(common::FaultDelay {
                percentage: pct(500_000),
                fault_delay_secifier: Some(common::fault_delay::FaultDelaySecifier::FixedDelay(
                    PbDuration {
                        seconds: 1,
                        nanos: 0,
                    },
                )),
            }),
            abort: Some(pb::FaultAbort {
                percentage: pct(1_000_000),
                error_type: Some(pb::fault_abort::ErrorType::HttpStatus(418)),
                ..Default::default()
            }),
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        let d = f.decide(0, 999_999);
        assert_eq!(d.delay, Some(Duration::from_secs(1)));
        assert_eq!(d.abort, Some(Abort::Http(418)));
        assert_eq!(f.decide(500_000, 0).delay, None, "outside the 50 %");
        assert_eq!(Fault::compile(&pb::HttpFault::default()).unwrap(), None);
        // No percentage: never (Envoy's default of 0).
        let never = Fault::compile(&pb::HttpFault {
            abort: Some(pb::FaultAbort {
                error_type: Some(pb::fault_abort::ErrorType::GrpcStatus(14)),
                ..Default::default()
            }),
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        assert_eq!(never.decide(0, 0).abort, None);
        assert!(
            Fault::compile(&pb::HttpFault {
                upstream_cluster: "c".into(),
                ..Default::default()
            })
            .unwrap_err()
            .contains("upstream_cluster")
        );
        assert_eq!(grpc_status_of(503), 14);
        assert_eq!(grpc_status_of(418), 2);
    }
}
