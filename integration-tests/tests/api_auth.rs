//! Who may call the API and what they may do, through the real clients: boto3 (botocore's
//! signer) and the AWS CLI with a profile holding a Sluice principal's keys, signing right and
//! wrong; identity policies per principal; resource policies added and removed with
//! AddPermission and RemovePermission; unsigned requests.

mod common;

use std::time::Duration;

use common::{Function, Sluice, aws_client_env, run_program};
use serde_json::{Value, json};
use sluice_integration_tests::{unique_name, venv_bin};

const CLIENT_LIMIT: Duration = Duration::from_secs(90);

const DEPLOYER: (&str, &str) = ("AKIASLUICEDEPLOY01", "deploy-secret");
const INVOKER: (&str, &str) = ("AKIASLUICEINVOKE01", "invoke-secret");
const OUTSIDER: (&str, &str) = ("AKIASLUICEOUTSID01", "outside-secret");

fn arn(function: &str) -> String {
    format!("arn:aws:lambda:us-east-1:000000000000:function:{function}")
}

/// `api:` with three principals: `deployer` may do everything, `invoker` may invoke every
/// function but `denied`, `outsider` has no identity policy at all.
fn api_yaml(denied: &str) -> String {
    format!(
        r#"api:
  auth: sigv4
  principals:
    deployer:
      access_key_id: {}
      secret_access_key: {}
      policy:
        Statement: [{{ Effect: Allow, Action: "lambda:*", Resource: "*" }}]
    invoker:
      access_key_id: {}
      secret_access_key: {}
      policy: '{{"Version": "2012-10-17", "Statement": [
        {{"Effect": "Allow", "Action": "lambda:invoke*", "Resource": "arn:aws:lambda:*:*:function:*"}},
        {{"Effect": "Deny", "Action": "lambda:InvokeFunction", "Resource": "{}"}}]}}'
    outsider:
      access_key_id: {}
      secret_access_key: {}
"#,
        DEPLOYER.0,
        DEPLOYER.1,
        INVOKER.0,
        INVOKER.1,
        arn(denied),
        OUTSIDER.0,
        OUTSIDER.1
    )
}

async fn start(name: &str, denied: &str) -> Sluice {
    Sluice::start_with(
        &[Function::rust(name), Function::rust(denied)],
        &api_yaml(denied),
    )
    .await
}

fn call(key: (&str, &str), op: &str, args: Value) -> Value {
    json!({"key": key.0, "secret": key.1, "op": op, "args": args})
}

/// Runs `clients/sigv4_calls.py` over `calls`; returns one result per call.
async fn sigv4_calls(sluice: &Sluice, calls: &[Value]) -> Vec<Value> {
    common::client_calls("sigv4_calls.py", sluice, calls).await
}

fn body_json(result: &Value) -> Value {
    serde_json::from_str(result["body"].as_str().unwrap_or("null")).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn botocore_signatures_are_verified_as_aws_verifies_them() {
    let name = unique_name("sigv4");
    let denied = unique_name("sigv4-denied");
    let sluice = start(&name, &denied).await;
    let invoke = json!({"FunctionName": name, "Payload": "{\"action\": \"echo\"}"});
    let path = format!("/2015-03-31/functions/{name}/invocations");
    let mut skew_past = call(DEPLOYER, "invoke", invoke.clone());
    skew_past["how"] = json!("skew");
    skew_past["skew"] = json!(-600);
    let mut skew_future = skew_past.clone();
    skew_future["skew"] = json!(600);
    let mut tamper = call(
        DEPLOYER,
        "",
        json!({"path": path, "body": "{\"amount\": 1}", "sent": "{\"amount\": 9}"}),
    );
    tamper["how"] = json!("tamper");
    let mut untampered = tamper.clone();
    untampered["args"]["sent"] = json!("{\"amount\": 1}");
    let mut presign = call(DEPLOYER, "get_function", json!({"FunctionName": name}));
    presign["how"] = json!("presign");
    let mut presign_post = call(
        DEPLOYER,
        "",
        json!({"path": format!("{path}?Qualifier=%24LATEST")}),
    );
    presign_post["how"] = json!("presign_post");
    let mut presign_wrong = presign.clone();
    presign_wrong["secret"] = json!("not-the-secret");

    let out = sigv4_calls(
        &sluice,
        &[
            call(DEPLOYER, "invoke", invoke.clone()),
            call((DEPLOYER.0, "not-the-secret"), "invoke", invoke.clone()),
            call(("AKIASLUICEUNKNOWN1", "x"), "invoke", invoke.clone()),
            skew_past,
            skew_future,
            tamper,
            untampered,
            presign,
            presign_post,
            presign_wrong,
        ],
    )
    .await;
    assert_eq!(out[0]["StatusCode"], 200, "{}", out[0]);
    assert_eq!(out[0]["Payload"]["event"]["action"], "echo", "{}", out[0]);

    assert_eq!(
        out[1]["exception"], "InvalidSignatureException",
        "{}",
        out[1]
    );
    assert_eq!(out[1]["status"], 403, "{}", out[1]);
    assert!(
        out[1]["message"].as_str().unwrap_or_default().starts_with(
            "The request signature we calculated does not match the signature you provided."
        ),
        "{}",
        out[1]
    );
    assert_eq!(
        out[2]["exception"], "UnrecognizedClientException",
        "{}",
        out[2]
    );
    assert_eq!(
        out[2]["message"], "The security token included in the request is invalid.",
        "{}",
        out[2]
    );
    assert_eq!(
        out[3]["exception"], "InvalidSignatureException",
        "{}",
        out[3]
    );
    assert!(
        out[3]["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("Signature expired: "),
        "{}",
        out[3]
    );
    assert!(
        out[4]["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("Signature not yet current: "),
        "{}",
        out[4]
    );
    assert_eq!(
        out[5]["status"], 403,
        "a body changed after signing: {}",
        out[5]
    );
    assert_eq!(
        out[5]["errortype"], "InvalidSignatureException",
        "{}",
        out[5]
    );
    assert_eq!(
        out[6]["status"], 200,
        "the same request untouched: {}",
        out[6]
    );
    assert_eq!(out[7]["status"], 200, "presigned GetFunction: {}", out[7]);
    assert_eq!(
        body_json(&out[7])["Configuration"]["FunctionName"],
        json!(name),
        "{}",
        out[7]
    );
    assert_eq!(out[8]["status"], 200, "presigned Invoke: {}", out[8]);
    assert_eq!(
        body_json(&out[8])["invoked_function_arn"],
        json!(format!("{}:$LATEST", arn(&name))),
        "the signed query reached the handler: {}",
        out[8]
    );
    assert_eq!(out[9]["status"], 403, "{}", out[9]);
    assert_eq!(
        out[9]["errortype"], "InvalidSignatureException",
        "{}",
        out[9]
    );
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_resource_policies_decide_who_may_do_what() {
    let name = unique_name("policy");
    let denied = unique_name("policy-denied");
    let sluice = start(&name, &denied).await;
    let invoke = |f: &str| json!({"FunctionName": f, "Payload": "{}"});
    let grant = json!({
        "FunctionName": name,
        "StatementId": "outsider-invoke",
        "Action": "lambda:InvokeFunction",
        "Principal": "outsider",
    });
    let out = sigv4_calls(
        &sluice,
        &[
            call(INVOKER, "invoke", invoke(&name)),
            call(INVOKER, "invoke", invoke(&denied)),
            call(INVOKER, "get_function", json!({"FunctionName": name})),
            call(OUTSIDER, "invoke", invoke(&name)),
            call(OUTSIDER, "add_permission", grant.clone()),
            call(DEPLOYER, "add_permission", grant.clone()),
            call(OUTSIDER, "invoke", invoke(&name)),
            call(OUTSIDER, "invoke", json!({"FunctionName": denied, "Payload": "{}"})),
            call(DEPLOYER, "get_policy", json!({"FunctionName": name})),
            call(DEPLOYER, "add_permission", grant.clone()),
            call(
                DEPLOYER,
                "remove_permission",
                json!({"FunctionName": name, "StatementId": "outsider-invoke", "RevisionId": "stale"}),
            ),
            call(
                DEPLOYER,
                "remove_permission",
                json!({"FunctionName": name, "StatementId": "outsider-invoke"}),
            ),
            call(OUTSIDER, "invoke", invoke(&name)),
            call(DEPLOYER, "get_policy", json!({"FunctionName": name})),
        ],
    )
    .await;
    assert_eq!(
        out[0]["StatusCode"], 200,
        "wildcard action allows: {}",
        out[0]
    );
    assert_eq!(out[1]["exception"], "AccessDeniedException", "{}", out[1]);
    assert_eq!(out[1]["status"], 403, "{}", out[1]);
    assert_eq!(
        out[1]["message"],
        format!(
            "User: arn:aws:iam::000000000000:user/invoker is not authorized to perform: lambda:InvokeFunction on resource: {} with an explicit deny in an identity-based policy",
            arn(&denied)
        ),
        "explicit deny wins over the wildcard allow"
    );
    assert_eq!(
        out[2]["message"],
        format!(
            "User: arn:aws:iam::000000000000:user/invoker is not authorized to perform: lambda:GetFunction on resource: {} because no identity-based policy allows the lambda:GetFunction action",
            arn(&name)
        ),
        "default deny"
    );
    assert_eq!(out[3]["exception"], "AccessDeniedException", "{}", out[3]);
    assert_eq!(
        out[4]["exception"], "AccessDeniedException",
        "AddPermission needs lambda:AddPermission: {}",
        out[4]
    );
    let statement: Value =
        serde_json::from_str(out[5]["Statement"].as_str().unwrap_or("null")).expect("statement");
    assert_eq!(
        statement,
        json!({
            "Sid": "outsider-invoke",
            "Effect": "Allow",
            "Principal": {"AWS": "arn:aws:iam::000000000000:user/outsider"},
            "Action": "lambda:InvokeFunction",
            "Resource": arn(&name),
        })
    );
    assert_eq!(
        out[6]["StatusCode"], 200,
        "granted by the resource policy: {}",
        out[6]
    );
    assert_eq!(
        out[7]["exception"], "AccessDeniedException",
        "only that function: {}",
        out[7]
    );
    let policy: Value =
        serde_json::from_str(out[8]["Policy"].as_str().unwrap_or("null")).expect("policy");
    assert_eq!(policy["Statement"][0], statement, "{}", out[8]);
    assert!(
        out[8]["RevisionId"].as_str().is_some_and(|r| !r.is_empty()),
        "{}",
        out[8]
    );
    assert_eq!(
        out[9]["exception"], "ResourceConflictException",
        "{}",
        out[9]
    );
    assert_eq!(
        out[10]["exception"], "PreconditionFailedException",
        "{}",
        out[10]
    );
    assert!(out[11].get("exception").is_none(), "{}", out[11]);
    assert_eq!(
        out[12]["exception"], "AccessDeniedException",
        "revoked: {}",
        out[12]
    );
    assert_eq!(
        out[13]["exception"], "ResourceNotFoundException",
        "{}",
        out[13]
    );
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aws_cli_signs_with_a_profile_and_a_wrong_secret_is_refused() {
    let name = unique_name("cli-auth");
    let denied = unique_name("cli-auth-denied");
    let sluice = start(&name, &denied).await;
    std::fs::write(
        sluice.dir().join("aws-credentials"),
        format!(
            "[sluice]\naws_access_key_id = {}\naws_secret_access_key = {}\n\n[wrong]\naws_access_key_id = {}\naws_secret_access_key = nope\n",
            DEPLOYER.0, DEPLOYER.1, DEPLOYER.0
        ),
    )
    .expect("credentials file");
    // Only the profile's keys: none from the environment.
    let env: Vec<(String, String)> = aws_client_env(sluice.dir())
        .into_iter()
        .filter(|(k, _)| !k.starts_with("AWS_ACCESS_KEY") && !k.starts_with("AWS_SECRET"))
        .collect();
    let cli = |profile: &'static str, args: Vec<String>| {
        let env = env.clone();
        let url = sluice.url.clone();
        async move {
            let mut all = vec![
                "--profile".to_owned(),
                profile.to_owned(),
                "--endpoint-url".to_owned(),
                url,
            ];
            all.extend(args);
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            run_program(&venv_bin("aws"), &refs, &env, CLIENT_LIMIT).await
        }
    };
    let get = |f: &str| {
        vec![
            "lambda".into(),
            "get-function".into(),
            "--function-name".into(),
            f.to_owned(),
        ]
    };
    let (code, stdout, stderr) = cli("sluice", get(&name)).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let got: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(got["Configuration"]["FunctionName"], json!(name));

    let (code, stdout, stderr) = cli(
        "sluice",
        vec![
            "lambda".into(),
            "add-permission".into(),
            "--function-name".into(),
            name.clone(),
            "--statement-id".into(),
            "anyone".into(),
            "--action".into(),
            "lambda:GetFunction".into(),
            "--principal".into(),
            "*".into(),
        ],
    )
    .await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("anyone"), "{stdout}");

    let (code, stdout, stderr) = cli("wrong", get(&name)).await;
    assert_ne!(code, 0, "{stdout}");
    assert!(stderr.contains("InvalidSignatureException"), "{stderr}");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsigned_request_gets_missing_authentication_token_and_health_stays_open() {
    let name = unique_name("unsigned");
    let denied = unique_name("unsigned-denied");
    let sluice = start(&name, &denied).await;
    let invoked = sluice.invoke(&name, &json!({})).await;
    assert_eq!(invoked.status, 403, "{}", invoked.text());
    assert_eq!(
        invoked.header("x-amzn-errortype").as_deref(),
        Some("MissingAuthenticationTokenException")
    );
    assert_eq!(invoked.json()["Message"], "Missing Authentication Token");
    // A made-up Authorization header is refused the same way, as a signature that cannot be read.
    let invoked = sluice
        .invoke_with(
            &name,
            &json!({}),
            &[("authorization", "AWS4-HMAC-SHA256 Credential=x")],
        )
        .await;
    assert_eq!(invoked.status, 403, "{}", invoked.text());
    assert_eq!(
        invoked.header("x-amzn-errortype").as_deref(),
        Some("IncompleteSignatureException")
    );
    let (status, body) = sluice.get("/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    sluice.shutdown().await;
}

/// A webhook with `auth: { type: aws_iam }` (a Function URL's `AWS_IAM`) runs its function only
/// for a request signed by a principal whose policies allow `lambda:InvokeFunctionUrl` on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aws_iam_webhook_takes_only_requests_signed_by_a_principal_allowed_to_call_it() {
    let name = unique_name("urliam");
    let denied = unique_name("urliam-denied");
    let hook = format!("/hooks/{name}");
    let yaml = format!(
        "{}sources:\n  {name}-url:\n    type: http\n    path: {hook}\n    function: {name}\n    auth: {{ type: aws_iam }}\n",
        api_yaml(&denied)
    );
    let sluice = Sluice::start_with(&[Function::rust(&name), Function::rust(&denied)], &yaml).await;
    let body = r#"{"hello":"url"}"#;
    let post = |key: (&str, &str), how: &str| {
        json!({"key": key.0, "secret": key.1, "how": how,
               "args": {"path": hook, "body": body, "sent": body}})
    };
    let out = sigv4_calls(
        &sluice,
        &[
            post(DEPLOYER, "tamper"),
            post(OUTSIDER, "tamper"),
            post((DEPLOYER.0, "not-the-secret"), "tamper"),
            post(DEPLOYER, "plain"),
        ],
    )
    .await;
    assert_eq!(
        out[0]["status"], 200,
        "the deployer may call it: {}",
        out[0]
    );
    assert_eq!(out[1]["status"], 403, "{}", out[1]);
    assert_eq!(out[1]["errortype"], "AccessDeniedException", "{}", out[1]);
    assert!(
        body_json(&out[1])["Message"]
            .as_str()
            .is_some_and(|m| m.contains("lambda:InvokeFunctionUrl")),
        "{}",
        out[1]
    );
    assert_eq!(out[2]["status"], 403, "{}", out[2]);
    assert_eq!(
        out[2]["errortype"], "InvalidSignatureException",
        "{}",
        out[2]
    );
    assert_eq!(out[3]["status"], 403, "{}", out[3]);
    assert_eq!(
        out[3]["errortype"], "MissingAuthenticationTokenException",
        "{}",
        out[3]
    );
    sluice.shutdown().await;
}
