//! Lambda's management API for what Sluice manages at run time: versions, aliases,
//! reserved concurrency, and reading functions. Same paths, shapes and error types as
//! Lambda's, so boto3 and the AWS CLI work against it. Request bodies are read against
//! `MAX_MANAGE_BODY` (see `api::read_body`): a huge body is refused, not buffered.

use std::collections::BTreeMap;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{ApiState, MAX_MANAGE_BODY, lambda_error, parse_function_ref, read_body};
use crate::function::{Function, Instance, LATEST, ManageError};
use crate::state::AliasRecord;

pub(crate) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/2015-03-31/functions", get(list_functions))
        .route("/2015-03-31/functions/", get(list_functions))
        .route("/2015-03-31/functions/{function}", get(get_function))
        .route(
            "/2015-03-31/functions/{function}/versions",
            get(list_versions).post(publish_version),
        )
        .route(
            "/2015-03-31/functions/{function}/aliases",
            get(list_aliases).post(create_alias),
        )
        .route(
            "/2015-03-31/functions/{function}/aliases/{alias}",
            get(get_alias).put(update_alias).delete(delete_alias),
        )
        .route(
            "/2017-10-31/functions/{function}/concurrency",
            axum::routing::put(put_concurrency).delete(delete_concurrency),
        )
        .route(
            "/2019-09-30/functions/{function}/concurrency",
            get(get_concurrency),
        )
}

fn error(e: ManageError) -> Response {
    match e {
        ManageError::NotFound(m) => {
            lambda_error(StatusCode::NOT_FOUND, "ResourceNotFoundException", &m)
        }
        ManageError::Conflict(m) => {
            lambda_error(StatusCode::CONFLICT, "ResourceConflictException", &m)
        }
        ManageError::InvalidParameter(m) => lambda_error(
            StatusCode::BAD_REQUEST,
            "InvalidParameterValueException",
            &m,
        ),
        ManageError::State(e) => lambda_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ServiceException",
            &e.to_string(),
        ),
        ManageError::Io(m) => {
            lambda_error(StatusCode::INTERNAL_SERVER_ERROR, "ServiceException", &m)
        }
    }
}

/// Request bodies are JSON whatever their content type says, and may be empty.
#[allow(
    clippy::result_large_err,
    reason = "the error is the handler's finished response, returned at once"
)]
fn parse_body<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| invalid(format!("invalid request body: {e}")))
}

fn ok(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

fn invalid(message: impl Into<String>) -> Response {
    error(ManageError::InvalidParameter(message.into()))
}

/// The function a path names; a qualifier in the name is refused where Lambda refuses it.
#[allow(
    clippy::result_large_err,
    reason = "the error is the handler's finished response, returned at once"
)]
fn function<'a>(state: &'a ApiState, raw: &str) -> Result<&'a std::sync::Arc<Function>, Response> {
    let fref = parse_function_ref(raw, None).map_err(invalid)?;
    state.functions.get(&fref.name).ok_or_else(|| {
        error(ManageError::NotFound(format!(
            "Function not found: {}",
            crate::invocation::function_arn(&fref.name)
        )))
    })
}

fn runtime_name(instance: &Instance) -> &'static str {
    match instance.config.runtime.as_str() {
        "process" => "provided.al2023",
        "http" => "sluice.http",
        _ => "sluice.native",
    }
}

/// Lambda's FunctionConfiguration for one version.
fn configuration(f: &Function, instance: &Instance) -> Value {
    let arn = if instance.version == LATEST {
        f.arn.clone()
    } else {
        format!("{}:{}", f.arn, instance.version)
    };
    json!({
        "FunctionName": f.name,
        "FunctionArn": arn,
        "Runtime": runtime_name(instance),
        "Role": format!("arn:aws:iam::{}:role/sluice", crate::invocation::ACCOUNT_ID),
        "Handler": instance.config.handler.clone().unwrap_or_default(),
        "CodeSize": 0,
        "Description": instance.description,
        "Timeout": instance.config.timeout().as_secs(),
        "MemorySize": instance.config.memory_mb,
        "LastModified": instance.last_modified,
        "CodeSha256": instance.code_sha256,
        "Version": instance.version,
        "Environment": {"Variables": instance.config.environment},
        "TracingConfig": {"Mode": "PassThrough"},
        "RevisionId": instance.code_sha256,
        "State": "Active",
        "LastUpdateStatus": "Successful",
        "PackageType": "Zip",
        "Architectures": [std::env::consts::ARCH.replace("aarch64", "arm64")],
    })
}

fn alias_json(f: &Function, a: &AliasRecord) -> Value {
    let mut body = json!({
        "AliasArn": format!("{}:{}", f.arn, a.name),
        "Name": a.name,
        "FunctionVersion": a.version,
        "Description": a.description,
        "RevisionId": a.revision_id,
    });
    if !a.weights.is_empty() {
        let weights: BTreeMap<&str, f64> =
            a.weights.iter().map(|(v, w)| (v.as_str(), *w)).collect();
        body["RoutingConfig"] = json!({ "AdditionalVersionWeights": weights });
    }
    body
}

async fn list_functions(State(state): State<ApiState>) -> Response {
    let mut all: Vec<_> = state.functions.all().collect();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    let list: Vec<Value> = all.iter().map(|f| configuration(f, f.latest())).collect();
    ok(StatusCode::OK, json!({ "Functions": list }))
}

#[derive(Debug, Deserialize)]
struct QualifierQuery {
    #[serde(rename = "Qualifier")]
    qualifier: Option<String>,
}

async fn get_function(
    State(state): State<ApiState>,
    Path(raw): Path<String>,
    Query(q): Query<QualifierQuery>,
) -> Response {
    let fref = match parse_function_ref(&raw, q.qualifier.as_deref()) {
        Ok(r) => r,
        Err(m) => return invalid(m),
    };
    let f = match function(&state, &fref.name) {
        Ok(f) => f,
        Err(r) => return r,
    };
    // An alias describes the version it points at; resolving it would pick by weight.
    let version = fref
        .qualifier
        .as_deref()
        .and_then(|q| f.alias(q))
        .map(|a| a.version);
    let Some(instance) = f.resolve(version.as_deref().or(fref.qualifier.as_deref())) else {
        return error(ManageError::NotFound(format!(
            "Function not found: {}:{}",
            f.arn,
            fref.qualifier.unwrap_or_default()
        )));
    };
    let mut body = json!({
        "Configuration": configuration(f, &instance),
        "Code": {"RepositoryType": "Local", "Location": instance.config.task_root.as_ref().map(|p| p.display().to_string()).unwrap_or_default()},
        "Tags": f.config.tags,
    });
    if let Some(r) = f.reserved_concurrency() {
        body["Concurrency"] = json!({ "ReservedConcurrentExecutions": r });
    }
    ok(StatusCode::OK, body)
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PublishBody {
    description: Option<String>,
    code_sha256: Option<String>,
}

async fn publish_version(
    State(state): State<ApiState>,
    Path(raw): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = match read_body(&headers, body, MAX_MANAGE_BODY, "PublishVersion").await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let body: PublishBody = match parse_body(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let f = match function(&state, &raw) {
        Ok(f) => f.clone(),
        Err(r) => return r,
    };
    let expected = body.code_sha256.as_deref().filter(|s| !s.is_empty());
    match state
        .functions
        .publish_version(&f.name, body.description.as_deref(), expected)
        .await
    {
        Ok(instance) => ok(StatusCode::CREATED, configuration(&f, &instance)),
        Err(e) => error(e),
    }
}

async fn list_versions(State(state): State<ApiState>, Path(raw): Path<String>) -> Response {
    let f = match function(&state, &raw) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let mut list = vec![configuration(f, f.latest())];
    list.extend(f.versions().iter().map(|v| configuration(f, v)));
    ok(StatusCode::OK, json!({ "Versions": list }))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RoutingConfig {
    #[serde(default)]
    additional_version_weights: BTreeMap<String, f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AliasBody {
    name: Option<String>,
    function_version: Option<String>,
    description: Option<String>,
    routing_config: Option<RoutingConfig>,
}

fn weights(routing: Option<RoutingConfig>) -> Option<Vec<(String, f64)>> {
    routing.map(|r| r.additional_version_weights.into_iter().collect())
}

async fn create_alias(
    State(state): State<ApiState>,
    Path(raw): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = match read_body(&headers, body, MAX_MANAGE_BODY, "CreateAlias").await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let body: AliasBody = match parse_body(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let f = match function(&state, &raw) {
        Ok(f) => f.clone(),
        Err(r) => return r,
    };
    let (Some(name), Some(version)) = (body.name.as_deref(), body.function_version.as_deref())
    else {
        return invalid("Name and FunctionVersion are required");
    };
    match state
        .functions
        .create_alias(
            &f.name,
            name,
            version,
            weights(body.routing_config).unwrap_or_default(),
            body.description.as_deref().unwrap_or_default(),
        )
        .await
    {
        Ok(a) => ok(StatusCode::CREATED, alias_json(&f, &a)),
        Err(e) => error(e),
    }
}

async fn list_aliases(State(state): State<ApiState>, Path(raw): Path<String>) -> Response {
    let f = match function(&state, &raw) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let list: Vec<Value> = f.aliases().iter().map(|a| alias_json(f, a)).collect();
    ok(StatusCode::OK, json!({ "Aliases": list }))
}

async fn get_alias(
    State(state): State<ApiState>,
    Path((raw, alias)): Path<(String, String)>,
) -> Response {
    let f = match function(&state, &raw) {
        Ok(f) => f,
        Err(r) => return r,
    };
    match state.functions.get_alias(&f.name, &alias) {
        Ok(a) => ok(StatusCode::OK, alias_json(f, &a)),
        Err(e) => error(e),
    }
}

async fn update_alias(
    State(state): State<ApiState>,
    Path((raw, alias)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = match read_body(&headers, body, MAX_MANAGE_BODY, "UpdateAlias").await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let body: AliasBody = match parse_body(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let f = match function(&state, &raw) {
        Ok(f) => f.clone(),
        Err(r) => return r,
    };
    match state
        .functions
        .update_alias(
            &f.name,
            &alias,
            body.function_version.as_deref(),
            weights(body.routing_config),
            body.description.as_deref(),
        )
        .await
    {
        Ok(a) => ok(StatusCode::OK, alias_json(&f, &a)),
        Err(e) => error(e),
    }
}

async fn delete_alias(
    State(state): State<ApiState>,
    Path((raw, alias)): Path<(String, String)>,
) -> Response {
    let f = match function(&state, &raw) {
        Ok(f) => f.clone(),
        Err(r) => return r,
    };
    match state.functions.delete_alias(&f.name, &alias).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error(e),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ConcurrencyBody {
    reserved_concurrent_executions: Option<u32>,
}

async fn put_concurrency(
    State(state): State<ApiState>,
    Path(raw): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = match read_body(&headers, body, MAX_MANAGE_BODY, "PutFunctionConcurrency").await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let f = match function(&state, &raw) {
        Ok(f) => f.clone(),
        Err(r) => return r,
    };
    let body: ConcurrencyBody = match parse_body(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Some(n) = body.reserved_concurrent_executions else {
        return invalid("ReservedConcurrentExecutions is required");
    };
    match state.functions.put_concurrency(&f.name, Some(n)).await {
        Ok(()) => ok(StatusCode::OK, json!({ "ReservedConcurrentExecutions": n })),
        Err(e) => error(e),
    }
}

async fn get_concurrency(State(state): State<ApiState>, Path(raw): Path<String>) -> Response {
    let f = match function(&state, &raw) {
        Ok(f) => f,
        Err(r) => return r,
    };
    match f.reserved_concurrency() {
        Some(n) => ok(StatusCode::OK, json!({ "ReservedConcurrentExecutions": n })),
        None => ok(StatusCode::OK, json!({})),
    }
}

async fn delete_concurrency(State(state): State<ApiState>, Path(raw): Path<String>) -> Response {
    let f = match function(&state, &raw) {
        Ok(f) => f.clone(),
        Err(r) => return r,
    };
    match state.functions.put_concurrency(&f.name, None).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error(e),
    }
}
