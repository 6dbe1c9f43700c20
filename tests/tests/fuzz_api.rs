//! The admin API under random requests: empty, huge and odd strings,
//! payloads at and over the message limit, attributes the conductor
//! refuses, protobuf with invalid UTF-8. Each call gets an answer or a
//! status a client can act on; the conductor neither panics nor grows
//! without bound, and its plugin never notices.
//!
//! Proptest's default 256 cases in `make test`; `PROPTEST_CASES` for more.

use std::collections::HashMap;

use demi_e2e::grpc::{self, admin_pb as pb};
use demi_e2e::{Conductor, rss_kib};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tonic::Code;

/// The limit tonic puts on a decoded message, the conductor's too.
const LIMIT: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone)]
enum Call {
    Submit {
        plugin: String,
        kind: String,
        payload: usize,
        attributes: HashMap<String, String>,
        idempotency_key: String,
        deadline: Option<i64>,
    },
    GetPlugin(String),
    GetJob(String),
    WaitJob(String, i64),
    Scale(String, u32),
    Stop(String),
    Replay(Vec<String>),
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "\\PC{0,24}",
        1 => Just(String::new()),
        1 => (0usize..300_000).prop_map(|n| "x".repeat(n)),
        1 => "[\\x00-\\x1f\\u{fffd}\\u{202e}]{0,8}",
    ]
}

/// A plugin name that is never the running `echo` (nothing may stop it).
fn other_name() -> impl Strategy<Value = String> {
    text().prop_filter("not echo", |n| n != "echo")
}

fn call() -> impl Strategy<Value = Call> {
    let payload = prop_oneof![
        Just(0usize),
        0usize..2048,
        Just(64 * 1024),
        Just(LIMIT - 4096),
        Just(LIMIT + 1),
    ];
    let attributes = prop::collection::hash_map(text(), text(), 0..4);
    prop_oneof![
        4 => (
            prop_oneof![Just("echo".to_owned()), text()],
            text(),
            payload,
            attributes,
            text(),
            prop::option::of(any::<i64>())
        )
            .prop_map(|(plugin, kind, payload, attributes, idempotency_key, deadline)| Call::Submit {
                plugin,
                kind,
                payload,
                attributes,
                idempotency_key,
                deadline
            }),
        1 => text().prop_map(Call::GetPlugin),
        1 => text().prop_map(Call::GetJob),
        1 => (text(), any::<i64>()).prop_map(|(id, t)| Call::WaitJob(id, t)),
        1 => (other_name(), any::<u32>()).prop_map(|(n, r)| Call::Scale(n, r)),
        1 => other_name().prop_map(Call::Stop),
        1 => prop::collection::vec(text(), 0..4).prop_map(Call::Replay),
    ]
}

type Api = pb::conductor_client::ConductorClient<tonic::transport::Channel>;

async fn make(mut api: Api, call: Call) -> Result<(), tonic::Status> {
    match call {
        Call::Submit {
            plugin,
            kind,
            payload,
            attributes,
            idempotency_key,
            deadline,
        } => {
            let request = pb::SubmitRequest {
                plugin,
                kind,
                payload: vec![b'p'; payload],
                attributes,
                idempotency_key,
                deadline: deadline.map(|seconds| prost_types::Timestamp { seconds, nanos: 0 }),
            };
            api.submit(request).await.map(drop)
        }
        Call::GetPlugin(name) => api.get_plugin(pb::PluginRef { name }).await.map(drop),
        Call::GetJob(job_id) => api.get_job(pb::GetJobRequest { job_id }).await.map(drop),
        Call::WaitJob(job_id, seconds) => {
            let request = pb::WaitJobRequest {
                job_id,
                timeout: Some(prost_types::Duration {
                    seconds: seconds % 3,
                    nanos: 0,
                }),
            };
            api.wait_job(request).await.map(drop)
        }
        Call::Scale(name, replicas) => api
            .scale_plugin(pb::ScalePluginRequest { name, replicas })
            .await
            .map(drop),
        Call::Stop(name) => api.stop_plugin(pb::PluginRef { name }).await.map(drop),
        Call::Replay(job_ids) => api
            .replay_dead_letters(pb::ReplayDeadLettersRequest {
                job_ids,
                ..Default::default()
            })
            .await
            .map(drop),
    }
}

/// A SubmitRequest for `echo` whose one attribute key is not UTF-8,
/// encoded by hand (prost will not make one).
fn invalid_utf8_submit() -> Vec<u8> {
    let mut entry = vec![0x0a, 2, 0xff, 0xfe, 0x12, 1, b'v'];
    let mut message = vec![0x0a, 4];
    message.extend_from_slice(b"echo");
    message.push(0x22);
    message.push(entry.len() as u8);
    message.append(&mut entry);
    message
}

/// Runs proptest's cases of `calls` through `make`: each answer is OK or
/// a status a client can act on (INVALID_ARGUMENT, NOT_FOUND,
/// OUT_OF_RANGE, RESOURCE_EXHAUSTED, FAILED_PRECONDITION, or one of
/// `also`) with a message. Returns how often each answer came.
fn fuzz<C: std::fmt::Debug, F: std::future::Future<Output = Result<(), tonic::Status>>>(
    runtime: &tokio::runtime::Runtime,
    calls: impl Strategy<Value = C>,
    also: &[Code],
    make: impl Fn(C) -> F,
) -> std::collections::BTreeMap<String, usize> {
    let allowed = [
        Code::InvalidArgument,
        Code::NotFound,
        Code::OutOfRange,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
    ];
    // Failures are shown, not stored: the tests run from a clean checkout.
    let mut runner = TestRunner::new(Config {
        failure_persistence: None,
        ..Config::default()
    });
    let seen = std::cell::RefCell::new(std::collections::BTreeMap::<String, usize>::new());
    runner
        .run(&calls, |call| {
            let shown = format!("{call:?}").chars().take(300).collect::<String>();
            let result = runtime.block_on(make(call));
            let name = match &result {
                Ok(()) => "ok".to_owned(),
                Err(status) => format!("{:?}", status.code()),
            };
            *seen.borrow_mut().entry(name).or_default() += 1;
            if let Err(status) = result {
                let code = status.code();
                prop_assert!(
                    (allowed.contains(&code) || also.contains(&code))
                        && !status.message().is_empty(),
                    "{shown}: {status:?}"
                );
            }
            Ok(())
        })
        .unwrap();
    seen.into_inner()
}

/// The conductor is whole, its plugin `echo` (pid `echo`) untouched, its
/// memory bounded.
fn unharmed(conductor: &Conductor, echo: u32, rss_before: u64) {
    let panics: Vec<_> = conductor
        .events()
        .into_iter()
        .filter(|e| e.to_string().contains("panicked"))
        .collect();
    assert!(panics.is_empty(), "{panics:?}");
    assert_eq!(conductor.pids_of("echo"), vec![u64::from(echo)]);
    let rss_after = rss_kib(conductor.pid());
    eprintln!("conductor RSS {rss_before} -> {rss_after} KiB");
    assert!(
        rss_after < rss_before + 256 * 1024,
        "{rss_before} -> {rss_after} KiB"
    );
}

#[test]
fn random_admin_requests_get_an_answer_or_a_clear_status_and_hurt_nothing() {
    let conductor = Conductor::builder().log("info").start(
        "[plugins.echo]\ncommand = \"{echo}\"\n[plugins.echo.dispatch]\nqueue_capacity = 100000\n",
    );
    let (_, echo) = conductor.wait_serving(0, "echo", 0);
    let socket = conductor.api_socket();
    let runtime = grpc::runtime();
    let api = runtime
        .block_on(grpc::admin(&socket))
        .max_decoding_message_size(usize::MAX);
    let rss_before = rss_kib(conductor.pid());

    let seen = fuzz(&runtime, call(), &[], |call| make(api.clone(), call));
    eprintln!("answers: {seen:?}");

    // Not UTF-8 where protobuf wants a string: refused, nothing stored.
    let channel = runtime.block_on(grpc::connect(&socket));
    let refused = runtime.block_on(grpc::raw_unary(
        channel,
        "/demi.conductor.v1.Conductor/Submit",
        invalid_utf8_submit(),
    ));
    let status = refused.expect_err("an attribute that is not UTF-8 was taken");
    assert!(
        status.message().contains("UTF-8") || status.message().contains("utf-8"),
        "{status:?}"
    );

    unharmed(&conductor, echo, rss_before);
}

/// A call to the plugin API (`demi.plugin.v1.Host`), as an instance makes
/// it, with random fields.
#[derive(Debug, Clone)]
enum HostCall {
    Submit {
        plugin: String,
        kind: String,
        payload: usize,
        attributes: HashMap<String, String>,
        idempotency_key: String,
        and_wait: bool,
    },
    GetJob(String),
    WaitJob(String, i64),
    Acquire(String, u32, i64),
    ReportHealth(bool, String),
    Membership,
}

fn host_call() -> impl Strategy<Value = HostCall> {
    let target = prop_oneof![3 => Just("echo".to_owned()), 1 => text()];
    let payload = prop_oneof![
        Just(0usize),
        0usize..2048,
        Just(LIMIT - 4096),
        Just(LIMIT + 1),
    ];
    let attributes = prop::collection::hash_map(text(), text(), 0..4);
    prop_oneof![
        4 => (target, text(), payload, attributes, text(), any::<bool>()).prop_map(
            |(plugin, kind, payload, attributes, idempotency_key, and_wait)| HostCall::Submit {
                plugin,
                kind,
                payload,
                attributes,
                idempotency_key,
                and_wait,
            }
        ),
        1 => text().prop_map(HostCall::GetJob),
        1 => (text(), any::<i64>()).prop_map(|(id, s)| HostCall::WaitJob(id, s)),
        2 => (
            prop_oneof![Just("rest".to_owned()), text()],
            prop_oneof![0u32..4, any::<u32>()],
            any::<i64>()
        )
            .prop_map(|(limit, bucket, wait)| HostCall::Acquire(limit, bucket, wait)),
        1 => (any::<bool>(), text()).prop_map(|(s, r)| HostCall::ReportHealth(s, r)),
        1 => Just(HostCall::Membership),
    ]
}

type Host = grpc::pb::host_client::HostClient<tonic::transport::Channel>;

async fn make_host(mut host: Host, token: &str, call: HostCall) -> Result<(), tonic::Status> {
    fn signed<T>(token: &str, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Ok(value) = format!("Bearer {token}").parse() {
            request.metadata_mut().insert("authorization", value);
        }
        request.set_timeout(std::time::Duration::from_secs(5));
        request
    }
    match call {
        HostCall::Submit {
            plugin,
            kind,
            payload,
            attributes,
            idempotency_key,
            and_wait,
        } => {
            let job = pb::SubmitRequest {
                plugin,
                kind,
                payload: vec![b'p'; payload],
                attributes,
                idempotency_key,
                deadline: None,
            };
            if and_wait {
                host.submit_and_wait(signed(token, job)).await.map(drop)
            } else {
                host.submit(signed(token, job)).await.map(drop)
            }
        }
        HostCall::GetJob(job_id) => host
            .get_job(signed(token, pb::GetJobRequest { job_id }))
            .await
            .map(drop),
        HostCall::WaitJob(job_id, seconds) => {
            let request = pb::WaitJobRequest {
                job_id,
                timeout: Some(prost_types::Duration {
                    seconds: seconds % 3,
                    nanos: 0,
                }),
            };
            host.wait_job(signed(token, request)).await.map(drop)
        }
        HostCall::Acquire(limit, bucket, wait) => {
            let mut request = signed(token, grpc::pb::AcquireRequest { limit, bucket });
            request.set_timeout(std::time::Duration::from_millis(
                wait.rem_euclid(500) as u64 + 1,
            ));
            host.acquire(request).await.map(drop).map_err(|status| {
                // tonic holds the client to the deadline too: under one of a
                // millisecond or two its own timer can fire before the
                // conductor's answer arrives. That is the deadline passing,
                // not an answer from the conductor.
                if status.code() == Code::Cancelled && status.message() == "Timeout expired" {
                    tonic::Status::deadline_exceeded("the client's deadline passed first")
                } else {
                    status
                }
            })
        }
        HostCall::ReportHealth(serving, reason) => host
            .report_health(signed(
                token,
                grpc::pb::ReportHealthRequest { serving, reason },
            ))
            .await
            .map(drop),
        HostCall::Membership => host
            .get_membership(signed(token, grpc::pb::GetMembershipRequest {}))
            .await
            .map(drop),
    }
}

#[test]
fn random_plugin_api_requests_get_an_answer_or_a_clear_status_and_hurt_nothing() {
    let files = tempfile::tempdir().unwrap();
    let token_file = files.path().join("token");
    // An instance that hands its token to the test: the fuzzer calls as it.
    let conductor = Conductor::builder().log("info").start(&format!(
        "[plugins.echo]\ncommand = \"{{echo}}\"\n[plugins.echo.dispatch]\nqueue_capacity = 100000\n\n\
         [plugins.caller]\ncommand = \"/bin/sh\"\n\
         args = [\"-c\", \"echo $DEMI_CONDUCTOR_TOKEN > {}; exec sleep 3600\"]\n\
         health = \"none\"\nsubmits_to = [\"echo\"]\n\
         [plugins.caller.shared_limits]\nrest = {{ rate = 50, per = \"1s\" }}\n",
        token_file.display()
    ));
    let (_, echo) = conductor.wait_serving(0, "echo", 0);
    demi_e2e::eventually("the caller's token", || {
        std::fs::read_to_string(&token_file).is_ok_and(|t| !t.trim().is_empty())
    });
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_owned();
    let socket = conductor.runtime_dir().join("plugin-api.sock");
    let runtime = grpc::runtime();
    let host = runtime.block_on(async {
        Host::new(grpc::connect(&socket).await).max_decoding_message_size(usize::MAX)
    });
    let rss_before = rss_kib(conductor.pid());

    let seen = fuzz(
        &runtime,
        host_call(),
        &[Code::PermissionDenied, Code::DeadlineExceeded],
        |call| make_host(host.clone(), &token, call),
    );
    eprintln!("plugin API answers: {seen:?}");

    // Not UTF-8 where protobuf wants a string: refused.
    let mut request = tonic::Request::new(invalid_utf8_submit());
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let channel = runtime.block_on(grpc::connect(&socket));
    let refused = runtime.block_on(grpc::raw_unary_request(
        channel,
        "/demi.plugin.v1.Host/Submit",
        request,
    ));
    let status = refused.expect_err("an attribute that is not UTF-8 was taken");
    assert!(
        status.message().to_lowercase().contains("utf-8"),
        "{status:?}"
    );

    unharmed(&conductor, echo, rss_before);
}
