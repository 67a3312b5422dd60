//! Pod sandboxes through containerd's CRI `RuntimeService`, as kubelet
//! starts them: `RunPodSandbox` (where containerd pulls the pause image
//! itself), `PodSandboxStatus`, `StopPodSandbox`, `RemovePodSandbox`. The
//! messages carry only the fields these tests set, with CRI's field numbers.

use std::path::Path;

use http::uri::PathAndQuery;
use tonic::{Request, Status};

#[derive(Clone, PartialEq, prost::Message)]
struct PodSandboxMetadata {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    uid: String,
    #[prost(string, tag = "3")]
    namespace: String,
    #[prost(uint32, tag = "4")]
    attempt: u32,
}

/// `NamespaceMode.NODE`: the pod shares the node's network, so no CNI is
/// needed.
const NAMESPACE_MODE_NODE: i32 = 2;

#[derive(Clone, PartialEq, prost::Message)]
struct NamespaceOption {
    #[prost(int32, tag = "1")]
    network: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LinuxSandboxSecurityContext {
    #[prost(message, optional, tag = "1")]
    namespace_options: Option<NamespaceOption>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LinuxPodSandboxConfig {
    #[prost(message, optional, tag = "2")]
    security_context: Option<LinuxSandboxSecurityContext>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PodSandboxConfig {
    #[prost(message, optional, tag = "1")]
    metadata: Option<PodSandboxMetadata>,
    #[prost(string, tag = "2")]
    hostname: String,
    #[prost(string, tag = "3")]
    log_directory: String,
    #[prost(message, optional, tag = "8")]
    linux: Option<LinuxPodSandboxConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RunPodSandboxRequest {
    #[prost(message, optional, tag = "1")]
    config: Option<PodSandboxConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RunPodSandboxResponse {
    #[prost(string, tag = "1")]
    pod_sandbox_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PodSandboxIdRequest {
    #[prost(string, tag = "1")]
    pod_sandbox_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PodSandboxStatus {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(int32, tag = "3")]
    state: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PodSandboxStatusResponse {
    #[prost(message, optional, tag = "1")]
    status: Option<PodSandboxStatus>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Empty {}

/// `PodSandboxState.SANDBOX_READY`.
pub const SANDBOX_READY: i32 = 0;

async fn call<Q, A>(socket: &Path, method: &'static str, request: Q) -> Result<A, Status>
where
    Q: prost::Message + Send + Sync + 'static,
    A: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(super::channel(socket));
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    grpc.unary(
        Request::new(request),
        PathAndQuery::from_static(method),
        tonic_prost::ProstCodec::default(),
    )
    .await
    .map(tonic::Response::into_inner)
}

/// Starts a pod sandbox named `name` on the node's network; its id.
pub async fn run(socket: &Path, name: &str, log_dir: &Path) -> Result<String, Status> {
    let request = RunPodSandboxRequest {
        config: Some(PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: format!("{name}-uid"),
                namespace: "default".into(),
                attempt: 0,
            }),
            // A pod on the node's network shares its UTS namespace too.
            hostname: String::new(),
            log_directory: log_dir.display().to_string(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NAMESPACE_MODE_NODE,
                    }),
                }),
            }),
        }),
    };
    let answer: RunPodSandboxResponse =
        call(socket, "/runtime.v1.RuntimeService/RunPodSandbox", request).await?;
    Ok(answer.pod_sandbox_id)
}

/// The sandbox's state (`SANDBOX_READY` when its pause process runs).
pub async fn state(socket: &Path, id: &str) -> Result<i32, Status> {
    let answer: PodSandboxStatusResponse = call(
        socket,
        "/runtime.v1.RuntimeService/PodSandboxStatus",
        PodSandboxIdRequest {
            pod_sandbox_id: id.into(),
        },
    )
    .await?;
    Ok(answer.status.map_or(-1, |s| s.state))
}

/// Stops and removes the sandbox.
pub async fn remove(socket: &Path, id: &str) -> Result<(), Status> {
    for method in [
        "/runtime.v1.RuntimeService/StopPodSandbox",
        "/runtime.v1.RuntimeService/RemovePodSandbox",
    ] {
        let _: Empty = call(
            socket,
            method,
            PodSandboxIdRequest {
                pod_sandbox_id: id.into(),
            },
        )
        .await?;
    }
    Ok(())
}
