//! A stand-in Kubernetes API server at the network boundary (plain HTTP/1.1 on loopback): list and watch of the kinds pilot reads, resourceVersions, 410 Gone after compaction, and TokenReview.
//!
//! It behaves as kube-apiserver does where pilot can tell: lists carry the collection's
//! `resourceVersion` and items without `apiVersion`/`kind`; `?watch=true&resourceVersion=N`
//! streams every change after N as chunked JSON lines (`ADDED`, `MODIFIED`, `DELETED`, objects
//! with their types) and stays open; a watch from a compacted version gets HTTP 200 and one
//! `ERROR` event with a 410 `Status`; an unserved kind answers 404 with a `Status`. Limits
//! (`limit`) are not implemented: every list is one page, which the API allows a server to do.
//! Field selectors are not applied either (clients must check what they get). A server-side
//! applied ConfigMap also lands in the ConfigMap collection, so watches see it.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

type Body = BoxBody<Bytes, Infallible>;

/// The kinds served: (apiVersion, kind, collection path across namespaces, namespaced).
pub const KINDS: [(&str, &str, &str, bool); 12] = [
    ("v1", "Namespace", "/api/v1/namespaces", false),
    ("v1", "ConfigMap", "/api/v1/configmaps", true),
    ("v1", "Pod", "/api/v1/pods", true),
    ("v1", "Service", "/api/v1/services", true),
    (
        "security.istio.io/v1",
        "AuthorizationPolicy",
        "/apis/security.istio.io/v1/authorizationpolicies",
        true,
    ),
    (
        "networking.istio.io/v1",
        "VirtualService",
        "/apis/networking.istio.io/v1/virtualservices",
        true,
    ),
    (
        "networking.istio.io/v1",
        "DestinationRule",
        "/apis/networking.istio.io/v1/destinationrules",
        true,
    ),
    (
        "networking.istio.io/v1",
        "ServiceEntry",
        "/apis/networking.istio.io/v1/serviceentries",
        true,
    ),
    (
        "gateway.networking.k8s.io/v1",
        "Gateway",
        "/apis/gateway.networking.k8s.io/v1/gateways",
        true,
    ),
    (
        "gateway.networking.k8s.io/v1",
        "HTTPRoute",
        "/apis/gateway.networking.k8s.io/v1/httproutes",
        true,
    ),
    (
        "gateway.networking.k8s.io/v1",
        "GRPCRoute",
        "/apis/gateway.networking.k8s.io/v1/grpcroutes",
        true,
    ),
    (
        "gateway.networking.k8s.io/v1beta1",
        "ReferenceGrant",
        "/apis/gateway.networking.k8s.io/v1beta1/referencegrants",
        true,
    ),
];
const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

#[derive(Default)]
struct Collection {
    objects: BTreeMap<(String, String), Value>,
    /// Every change, in order: (resourceVersion, event type, object).
    events: Vec<(u64, &'static str, Value)>,
    /// Answer lists and watches with 404 (the CRD is not installed).
    unserved: bool,
    /// Answer lists with 500.
    failing: bool,
    lists: usize,
    watches: usize,
}

/// What TokenReview answers for a token.
#[derive(Clone, Debug)]
pub struct TokenInfo {
    pub username: String,
    pub audiences: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    /// Bumped to end every open watch (as an API server restart or a load balancer would).
    epoch: u64,
    /// Open watches deliver nothing while set (a client cut off from the server).
    paused: bool,
    collections: Vec<Collection>,
    tokens: HashMap<String, TokenInfo>,
    reviews: Vec<Value>,
    /// TokenReviews being answered now, and the most ever at once.
    reviews_in_flight: usize,
    max_reviews_in_flight: usize,
    /// Server-side applied objects by request path, with the `fieldManager` and `force` of
    /// their last apply.
    applied: BTreeMap<String, Applied>,
    /// Answer server-side applies with 500 (counted in `apply_requests`, nothing stored).
    apply_failing: bool,
    apply_requests: usize,
    /// Merge patches of status subresources received: (request path, patch body).
    status_patches: Vec<(String, Value)>,
    /// Objects served by get and create (Secrets), by object path.
    stored: BTreeMap<String, Value>,
}

/// An object received by server-side apply (as the server stored it), and how.
#[derive(Clone, Debug)]
pub struct Applied {
    pub object: Value,
    pub field_manager: String,
    pub force: bool,
    /// Applies of this object so far.
    pub count: usize,
}

/// The object paths server-side apply is served on: (collection segment after the namespace,
/// API prefix, apiVersion, kind).
const APPLIED_KINDS: [(&str, &str, &str, &str); 4] = [
    ("serviceaccounts", "/api/v1", "v1", "ServiceAccount"),
    ("configmaps", "/api/v1", "v1", "ConfigMap"),
    ("deployments", "/apis/apps/v1", "apps/v1", "Deployment"),
    ("services", "/api/v1", "v1", "Service"),
];

pub struct ApiServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    /// Sent the latest resourceVersion or epoch on every change, to wake the watches.
    changed: watch::Sender<u64>,
    /// While `true`, TokenReviews are received (and counted) but not answered.
    hold_reviews: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ApiServer {
    pub async fn start() -> ApiServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            rv: 1000,
            collections: KINDS.iter().map(|_| Collection::default()).collect(),
            ..State::default()
        }));
        let (changed, _) = watch::channel(0);
        let (hold_reviews, _) = watch::channel(false);
        let server = Server {
            state: state.clone(),
            changed: changed.clone(),
            hold_reviews: hold_reviews.clone(),
        };
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let server = server.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let server = server.clone();
                        async move { Ok::<_, Infallible>(server.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        ApiServer {
            addr,
            state,
            changed,
            hold_reviews,
            task,
        }
    }

    /// A kube client for this server, as `Config::infer` would make for a real one.
    pub fn client(&self) -> kube::Client {
        let url = format!("http://{}", self.addr).parse().unwrap();
        kube::Client::try_from(kube::Config::new(url)).unwrap()
    }

    fn kind_index(api_version: &str, kind: &str) -> usize {
        KINDS
            .iter()
            .position(|(a, k, _, _)| *a == api_version && *k == kind)
            .unwrap_or_else(|| {
                panic!("the stand-in API server does not serve {api_version} {kind}")
            })
    }

    /// Create or replace an object (as `kubectl apply`): namespace defaulted, a uid given when
    /// it has none, a new resourceVersion.
    pub fn apply(&self, object: Value) {
        let rv = store(&mut self.state.lock().unwrap(), object);
        self.changed.send_replace(rv);
    }

    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) {
        let i = Self::kind_index(api_version, kind);
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        let c = &mut s.collections[i];
        let mut object = c
            .objects
            .remove(&(namespace.to_string(), name.to_string()))
            .unwrap_or_else(|| panic!("no {kind} {namespace}/{name} to delete"));
        object["metadata"]["resourceVersion"] = rv.to_string().into();
        c.events.push((rv, "DELETED", object));
        drop(s);
        self.changed.send_replace(rv);
    }

    /// Forget the history so far: a watch resuming from before now gets 410 Gone.
    pub fn compact(&self) {
        let mut s = self.state.lock().unwrap();
        s.compacted = s.rv + 1;
        for c in &mut s.collections {
            c.events.clear();
        }
    }

    /// End every open watch; clients resume from the last resourceVersion they saw.
    pub fn disconnect_watches(&self) {
        let mut s = self.state.lock().unwrap();
        s.epoch += 1;
        let epoch = s.epoch;
        drop(s);
        self.changed.send_replace(u64::MAX - epoch);
    }

    /// While paused, open watches deliver nothing: changes made meanwhile reach a client only
    /// if it resumes before they are compacted away.
    pub fn pause_watches(&self, paused: bool) {
        self.state.lock().unwrap().paused = paused;
        self.changed.send_modify(|_| {});
    }

    pub fn set_served(&self, kind: &str, served: bool) {
        let i = KINDS.iter().position(|k| k.1 == kind).unwrap();
        self.state.lock().unwrap().collections[i].unserved = !served;
    }

    pub fn set_failing(&self, kind: &str, failing: bool) {
        let i = KINDS.iter().position(|k| k.1 == kind).unwrap();
        self.state.lock().unwrap().collections[i].failing = failing;
    }

    /// (lists, watches) requested of `kind` so far.
    pub fn requests(&self, kind: &str) -> (usize, usize) {
        let i = KINDS.iter().position(|k| k.1 == kind).unwrap();
        let s = self.state.lock().unwrap();
        (s.collections[i].lists, s.collections[i].watches)
    }

    /// Every object held, with its apiVersion and kind (as `kubectl get -o yaml` shows them).
    pub fn objects(&self) -> Vec<Value> {
        let s = self.state.lock().unwrap();
        s.collections
            .iter()
            .flat_map(|c| c.objects.values().cloned())
            .collect()
    }

    pub fn add_token(&self, token: &str, info: TokenInfo) {
        self.state
            .lock()
            .unwrap()
            .tokens
            .insert(token.to_string(), info);
    }

    /// The TokenReview requests received, in order.
    pub fn reviews(&self) -> Vec<Value> {
        self.state.lock().unwrap().reviews.clone()
    }

    /// Hold TokenReview answers back (`true`) or answer them, the held ones included.
    pub fn hold_reviews(&self, held: bool) {
        self.hold_reviews.send_replace(held);
    }

    /// Server-side applied objects by path (`/apis/apps/v1/namespaces/<ns>/deployments/<name>`).
    pub fn applied(&self) -> BTreeMap<String, Applied> {
        self.state.lock().unwrap().applied.clone()
    }

    /// Answer server-side applies with 500 (`true`) or serve them.
    /// The Secret `namespace/name`, if stored.
    pub fn secret(&self, namespace: &str, name: &str) -> Option<Value> {
        let path = format!("/api/v1/namespaces/{namespace}/secrets/{name}");
        self.state.lock().unwrap().stored.get(&path).cloned()
    }

    /// Store a Secret as if created earlier.
    pub fn put_secret(&self, object: Value) {
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap()
            .to_string();
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        let path = format!("/api/v1/namespaces/{ns}/secrets/{name}");
        self.state.lock().unwrap().stored.insert(path, object);
    }

    pub fn set_apply_failing(&self, failing: bool) {
        self.state.lock().unwrap().apply_failing = failing;
    }

    /// Server-side apply requests received so far, failed ones included.
    /// Status subresource merge patches received so far: (request path, patch body).
    pub fn status_patches(&self) -> Vec<(String, Value)> {
        self.state.lock().unwrap().status_patches.clone()
    }

    pub fn apply_requests(&self) -> usize {
        self.state.lock().unwrap().apply_requests
    }

    /// (TokenReviews being answered now, most ever at once).
    pub fn reviews_in_flight(&self) -> (usize, usize) {
        let s = self.state.lock().unwrap();
        (s.reviews_in_flight, s.max_reviews_in_flight)
    }
}

#[derive(Clone)]
struct Server {
    state: Arc<Mutex<State>>,
    changed: watch::Sender<u64>,
    hold_reviews: watch::Sender<bool>,
}

/// Create or replace `object` in its collection (namespace defaulted, uid kept or given, a new
/// resourceVersion) and record the watch event; returns the resourceVersion.
fn store(s: &mut State, mut object: Value) -> u64 {
    let api_version = object["apiVersion"].as_str().unwrap().to_string();
    let kind = object["kind"].as_str().unwrap().to_string();
    let i = ApiServer::kind_index(&api_version, &kind);
    s.rv += 1;
    let rv = s.rv;
    let meta = object["metadata"].as_object_mut().unwrap();
    if KINDS[i].3 && !meta.contains_key("namespace") {
        meta.insert("namespace".into(), "default".into());
    }
    let key = (
        meta.get("namespace")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        meta["name"].as_str().unwrap().to_string(),
    );
    meta.insert("resourceVersion".into(), rv.to_string().into());
    let c = &mut s.collections[i];
    let old_uid = c.objects.get(&key).map(|o| o["metadata"]["uid"].clone());
    let meta = object["metadata"].as_object_mut().unwrap();
    if !meta.contains_key("uid") {
        meta.insert(
            "uid".into(),
            old_uid.unwrap_or_else(|| format!("uid-{rv}").into()),
        );
    }
    let event = if c.objects.contains_key(&key) {
        "MODIFIED"
    } else {
        "ADDED"
    };
    c.objects.insert(key, object.clone());
    c.events.push((rv, event, object));
    rv
}

fn full(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

fn error(code: u16, reason: &str, message: &str) -> Response<Body> {
    full(
        StatusCode::from_u16(code).unwrap(),
        &status(code, reason, message),
    )
}

impl Server {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let query: HashMap<String, String> = req
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if path == TOKEN_REVIEWS && req.method() == hyper::Method::POST {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            {
                let mut s = self.state.lock().unwrap();
                s.reviews_in_flight += 1;
                s.max_reviews_in_flight = s.max_reviews_in_flight.max(s.reviews_in_flight);
            }
            let mut hold = self.hold_reviews.subscribe();
            let _ = hold.wait_for(|held| !held).await;
            let answer = self.token_review(serde_json::from_slice(&body).unwrap());
            self.state.lock().unwrap().reviews_in_flight -= 1;
            return answer;
        }
        if req.method() == hyper::Method::PATCH && path.ends_with("/status") {
            return self.status_patch(req, &path).await;
        }
        if req.method() == hyper::Method::PATCH {
            return self.server_side_apply(req, &path, &query).await;
        }
        if path.starts_with("/api/v1/namespaces/") && path.contains("/secrets") {
            return self.get_or_create(req, &path).await;
        }
        let Some(i) = KINDS.iter().position(|k| k.2 == path) else {
            return error(
                404,
                "NotFound",
                "the server could not find the requested resource",
            );
        };
        if req.method() != hyper::Method::GET {
            return error(405, "MethodNotAllowed", "only list and watch are served");
        }
        if query.get("watch").map(String::as_str) == Some("true") {
            self.watch(i, &query)
        } else {
            self.list(i)
        }
    }

    /// Get (`GET …/secrets/<name>`) and create (`POST …/secrets`) of Secrets: 404 when absent,
    /// 409 `AlreadyExists` when creating one that exists, as kube-apiserver answers.
    async fn get_or_create(&self, req: Request<Incoming>, path: &str) -> Response<Body> {
        let parts: Vec<&str> = path.split('/').collect();
        match (req.method().clone(), parts.as_slice()) {
            (hyper::Method::GET, ["", "api", "v1", "namespaces", _, "secrets", name]) => {
                match self.state.lock().unwrap().stored.get(path) {
                    Some(o) => full(StatusCode::OK, o),
                    None => error(404, "NotFound", &format!("secrets \"{name}\" not found")),
                }
            }
            (hyper::Method::POST, ["", "api", "v1", "namespaces", ns, "secrets"]) => {
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let mut object: Value = match serde_json::from_slice(&body) {
                    Ok(v) => v,
                    Err(e) => return error(400, "BadRequest", &format!("body: {e}")),
                };
                let Some(name) = object["metadata"]["name"].as_str().map(str::to_string) else {
                    return error(422, "Invalid", "metadata.name: Required value");
                };
                let key = format!("{path}/{name}");
                let mut s = self.state.lock().unwrap();
                if s.stored.contains_key(&key) {
                    return error(
                        409,
                        "AlreadyExists",
                        &format!("secrets \"{name}\" already exists"),
                    );
                }
                s.rv += 1;
                let rv = s.rv;
                let meta = object["metadata"].as_object_mut().unwrap();
                meta.insert("namespace".into(), (*ns).into());
                meta.insert("resourceVersion".into(), rv.to_string().into());
                meta.insert("uid".into(), format!("uid-{rv}").into());
                s.stored.insert(key, object.clone());
                full(StatusCode::CREATED, &object)
            }
            _ => error(
                405,
                "MethodNotAllowed",
                "only get and create of Secrets are served",
            ),
        }
    }

    /// Server-side apply (`PATCH` with `application/apply-patch+yaml`) of a namespaced object of
    /// `APPLIED_KINDS`: the body must name the path's object and kind and the request a field
    /// manager, as kube-apiserver requires; the object is stored (uid kept across applies) and
    /// returned. Field ownership and merging are not modelled: the last apply replaces it.
    async fn server_side_apply(
        &self,
        req: Request<Incoming>,
        path: &str,
        query: &HashMap<String, String>,
    ) -> Response<Body> {
        {
            let mut s = self.state.lock().unwrap();
            s.apply_requests += 1;
            if s.apply_failing {
                return error(500, "InternalError", "etcdserver: request timed out");
            }
        }
        let content_type = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let parts: Vec<&str> = path.split('/').collect();
        // ["", "api", "v1", "namespaces", ns, resource, name] or with "apis", group, version.
        let (prefix, rest) = parts.split_at(parts.len().saturating_sub(4));
        let prefix = prefix.join("/");
        let found = match rest {
            ["namespaces", ns, resource, name] => APPLIED_KINDS
                .iter()
                .find(|k| k.0 == *resource && k.1 == prefix)
                .map(|k| (k, ns.to_string(), name.to_string())),
            _ => None,
        };
        let Some(((_, _, api_version, kind), ns, name)) = found else {
            return error(
                404,
                "NotFound",
                "the server could not find the requested resource",
            );
        };
        if content_type != "application/apply-patch+yaml" {
            return error(
                415,
                "UnsupportedMediaType",
                &format!("only server-side apply is served, not {content_type:?}"),
            );
        }
        let Some(field_manager) = query.get("fieldManager").cloned() else {
            return error(
                422,
                "Invalid",
                "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
            );
        };
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let mut object: Value = match serde_yaml_ng::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return error(400, "BadRequest", &format!("body: {e}")),
        };
        if object["apiVersion"] != *api_version
            || object["kind"] != *kind
            || object["metadata"]["name"] != name.as_str()
            || object["metadata"]["namespace"]
                .as_str()
                .is_some_and(|n| n != ns)
        {
            return error(
                400,
                "BadRequest",
                &format!("the body is not {api_version} {kind} {ns}/{name}"),
            );
        }
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        let previous = s.applied.get(path).cloned();
        let meta = object["metadata"].as_object_mut().unwrap();
        meta.insert("namespace".into(), ns.into());
        meta.insert("resourceVersion".into(), rv.to_string().into());
        let uid = previous
            .as_ref()
            .map(|p| p.object["metadata"]["uid"].clone())
            .unwrap_or_else(|| format!("uid-{rv}").into());
        meta.insert("uid".into(), uid);
        let created = previous.is_none();
        if *kind == "ConfigMap" {
            // Listed and watched too (by the ConfigMap's owner): stored there as well, with
            // the uid given here. Applied Services stay out of the Service collection, as
            // the tests of the model expect.
            let rv = store(&mut s, object.clone());
            self.changed.send_replace(rv);
        }
        s.applied.insert(
            path.to_string(),
            Applied {
                object: object.clone(),
                field_manager,
                force: query.get("force").map(String::as_str) == Some("true"),
                count: previous.map_or(0, |p| p.count) + 1,
            },
        );
        full(
            if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            &object,
        )
    }

    /// A JSON merge patch (`application/merge-patch+json`) of an object's `status` subresource
    /// (`.../namespaces/<ns>/<plural>/<name>/status` of a served kind): the patch's `status`
    /// merged into the object's (RFC 7386: objects merged, everything else replaced), a new
    /// resourceVersion and a MODIFIED event, as kube-apiserver does; anything but `status` in
    /// the patch is ignored, as the subresource does. 404 for an object that does not exist.
    async fn status_patch(&self, req: Request<Incoming>, path: &str) -> Response<Body> {
        let content_type = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        if content_type != "application/merge-patch+json" {
            return error(
                415,
                "UnsupportedMediaType",
                &format!("only merge patches of status are served, not {content_type:?}"),
            );
        }
        let parts: Vec<&str> = path.split('/').collect();
        // [.., "namespaces", ns, plural, name, "status"]
        let n = parts.len();
        if n < 6 || parts[n - 5] != "namespaces" {
            return error(404, "NotFound", "not a namespaced status subresource");
        }
        let (ns, plural, name) = (parts[n - 4], parts[n - 3], parts[n - 2]);
        let prefix = parts[..n - 5].join("/");
        let Some(i) = KINDS
            .iter()
            .position(|k| k.3 && k.2 == format!("{prefix}/{plural}"))
        else {
            return error(
                404,
                "NotFound",
                "the server could not find the requested resource",
            );
        };
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let patch: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return error(400, "BadRequest", &format!("body: {e}")),
        };
        fn merge(target: &mut Value, patch: &Value) {
            match (target, patch) {
                (Value::Object(t), Value::Object(p)) => {
                    for (k, v) in p {
                        if v.is_null() {
                            t.remove(k);
                        } else {
                            merge(t.entry(k.clone()).or_insert(Value::Null), v);
                        }
                    }
                }
                (t, p) => *t = p.clone(),
            }
        }
        let mut s = self.state.lock().unwrap();
        let key = (ns.to_string(), name.to_string());
        if !s.collections[i].objects.contains_key(&key) {
            return error(404, "NotFound", &format!("{plural} {ns}/{name} not found"));
        }
        s.rv += 1;
        let rv = s.rv;
        s.status_patches.push((path.to_string(), patch.clone()));
        let c = &mut s.collections[i];
        let object = c.objects.get_mut(&key).unwrap();
        if !object.get("status").is_some_and(Value::is_object) {
            object["status"] = json!({});
        }
        merge(&mut object["status"], &patch["status"]);
        object["metadata"]["resourceVersion"] = rv.to_string().into();
        let object = object.clone();
        c.events.push((rv, "MODIFIED", object.clone()));
        drop(s);
        self.changed.send_replace(rv);
        full(StatusCode::OK, &object)
    }

    fn list(&self, i: usize) -> Response<Body> {
        let mut s = self.state.lock().unwrap();
        let rv = s.rv;
        let c = &mut s.collections[i];
        c.lists += 1;
        if c.unserved {
            return error(
                404,
                "NotFound",
                "the server could not find the requested resource",
            );
        }
        if c.failing {
            return error(500, "InternalError", "etcdserver: request timed out");
        }
        // List items come without apiVersion and kind, as kube-apiserver sends them.
        let items: Vec<Value> = c
            .objects
            .values()
            .map(|o| {
                let mut o = o.clone();
                let m = o.as_object_mut().unwrap();
                m.remove("apiVersion");
                m.remove("kind");
                o
            })
            .collect();
        let (api_version, kind, _, _) = KINDS[i];
        full(
            StatusCode::OK,
            &json!({
                "apiVersion": api_version, "kind": format!("{kind}List"),
                "metadata": {"resourceVersion": rv.to_string()},
                "items": items,
            }),
        )
    }

    fn watch(&self, i: usize, query: &HashMap<String, String>) -> Response<Body> {
        let from: u64 = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(290u64);
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
        let line = |v: &Value| Ok(Frame::data(Bytes::from(format!("{v}\n"))));
        {
            let mut s = self.state.lock().unwrap();
            let c = &mut s.collections[i];
            c.watches += 1;
            if c.unserved {
                return error(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                );
            }
            if from < s.compacted {
                let gone = json!({"type": "ERROR", "object": status(
                    410, "Expired",
                    &format!("too old resource version: {from} ({})", s.compacted),
                )});
                let _ = tx.try_send(line(&gone));
                return self.streaming(rx);
            }
        }
        let state = self.state.clone();
        let mut changed = self.changed.subscribe();
        tokio::spawn(async move {
            let epoch = state.lock().unwrap().epoch;
            let mut last = from;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
            loop {
                changed.borrow_and_update();
                let (events, ended) = {
                    let s = state.lock().unwrap();
                    let events: Vec<(u64, Value)> = s.collections[i]
                        .events
                        .iter()
                        .filter(|(rv, _, _)| *rv > last && !s.paused)
                        .map(|(rv, kind, object)| (*rv, json!({"type": kind, "object": object})))
                        .collect();
                    (events, s.epoch != epoch)
                };
                if ended {
                    return;
                }
                for (rv, event) in events {
                    if tx.send(line(&event)).await.is_err() {
                        return;
                    }
                    last = rv;
                }
                match tokio::time::timeout_at(deadline, changed.changed()).await {
                    Ok(Ok(())) => {}
                    _ => return,
                }
            }
        });
        self.streaming(rx)
    }

    fn streaming(&self, rx: mpsc::Receiver<Result<Frame<Bytes>, Infallible>>) -> Response<Body> {
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(BodyExt::boxed(StreamBody::new(ReceiverStream::new(rx))))
            .unwrap()
    }

    fn token_review(&self, request: Value) -> Response<Body> {
        let mut s = self.state.lock().unwrap();
        s.reviews.push(request.clone());
        let token = request["spec"]["token"].as_str().unwrap_or_default();
        let wanted: Vec<String> = request["spec"]["audiences"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let status = match s.tokens.get(token) {
            None => json!({"authenticated": false, "error": "invalid bearer token"}),
            Some(info) => {
                // As kube-apiserver: the answer's audiences are the intersection, and a token
                // valid for none of the requested ones is not authenticated.
                let common: Vec<&String> = info
                    .audiences
                    .iter()
                    .filter(|a| wanted.is_empty() || wanted.contains(a))
                    .collect();
                if common.is_empty() {
                    json!({"authenticated": false, "error": format!(
                        "token audiences {:?} is invalid for the target audiences {wanted:?}",
                        info.audiences
                    )})
                } else {
                    json!({
                        "authenticated": true,
                        "audiences": common,
                        "user": {
                            "username": info.username,
                            "uid": format!("uid-{}", info.username),
                            "groups": ["system:serviceaccounts", "system:authenticated"],
                            "extra": info.extra,
                        },
                    })
                }
            }
        };
        full(
            StatusCode::CREATED,
            &json!({
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "metadata": {"creationTimestamp": null},
                "spec": request["spec"],
                "status": status,
            }),
        )
    }
}
