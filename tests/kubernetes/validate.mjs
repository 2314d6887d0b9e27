// Validates Prometheus Operator objects (JSON list on stdin) against the operator's CRD schemas,
// as packaged by @kubernetes-models/prometheus-operator. Prints one line per object: "ok KIND NAME"
// or "invalid KIND NAME: why"; exits 1 if any is invalid or of a kind it does not know.
import * as monitoring from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const objects = JSON.parse(await new Promise((resolve) => {
  let text = "";
  process.stdin.on("data", (chunk) => { text += chunk; });
  process.stdin.on("end", () => resolve(text));
}));
let failed = false;
for (const object of objects) {
  const name = `${object.kind} ${object.metadata?.name}`;
  const Model = object.apiVersion === "monitoring.coreos.com/v1" ? monitoring[object.kind] : undefined;
  if (Model === undefined) {
    console.log(`invalid ${name}: no schema for ${object.apiVersion} ${object.kind}`);
    failed = true;
    continue;
  }
  try {
    new Model(object).validate();
    console.log(`ok ${name}`);
  } catch (error) {
    console.log(`invalid ${name}: ${error.message}`);
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
