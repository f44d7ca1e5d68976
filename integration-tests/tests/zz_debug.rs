mod common;
use common::{Function, Sluice};
use serde_json::json;
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_dump() {
    let name = sluice_integration_tests::unique_name("dbg");
    let py = sluice_integration_tests::unique_name("dbgpy");
    let sluice = Sluice::start(&[Function::rust(&name).set("timeout", "1s").set("memory_mb", "128"), Function::python(&py, "python-import-error")]).await;
    let r = sluice.invoke_with(&name, &json!({"action":"echo","env_names":["PATH","HOME","AWS_SECRET_ACCESS_KEY","TZ","AWS_EXECUTION_ENV"]}), &[("X-Amz-Log-Type","Tail")]).await;
    eprintln!("{:?}\n{}\n{}", r.headers, r.text(), r.log_result());
    for ev in [json!({"action":"sleep","ms":3000}), json!({"action":"crash","code":7}), json!({"action":"alloc","mb":400})] {
        let r = sluice.invoke_with(&name, &ev, &[("X-Amz-Log-Type","Tail")]).await;
        eprintln!("{ev} -> {} {:?} {} {:?}\n{}", r.status, r.function_error(), r.text(), r.elapsed, r.log_result());
    }
    let r = sluice.invoke_with(&py, &json!({}), &[("X-Amz-Log-Type","Tail")]).await;
    eprintln!("py -> {} {:?} {} {:?}\n{}", r.status, r.function_error(), r.text(), r.elapsed, r.log_result());
    let r = sluice.invoke(&sluice_integration_tests::unique_name("nope"), &json!({})).await;
    eprintln!("404 -> {} {:?} {}", r.status, r.headers, r.text());
    sluice.shutdown().await;
}
