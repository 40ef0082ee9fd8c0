// /docs: the HTTP API reference, drawn from /openapi.json by this page alone. Swagger UI
// loads its code from a CDN, which leaves the page blank offline; this needs nothing else.
"use strict";

const $ = (selector) => document.querySelector(selector);
let spec = null;

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

// "#/components/schemas/JobStatus" -> that schema, with its name.
function resolve(schema) {
  if (!schema || !schema.$ref) return schema || {};
  const name = schema.$ref.split("/").pop();
  return {...spec.components.schemas[name], title: name};
}

function typeOf(schema) {
  if (schema.$ref) return resolve(schema).title;
  if (schema.anyOf) {
    return schema.anyOf.filter((option) => option.type !== "null").map(typeOf).join(" or ");
  }
  if (schema.enum) return schema.enum.map((value) => JSON.stringify(value)).join(" | ");
  if (schema.contentMediaType || schema.format === "binary") return "file";
  if (schema.type === "array") return `list of ${typeOf(schema.items || {})}`;
  let text = schema.type || "any";
  if (schema.minimum !== undefined && schema.maximum !== undefined) {
    text += ` (${schema.minimum} to ${schema.maximum})`;
  }
  return text;
}

function table(headings, rows) {
  const node = element("table");
  const head = node.createTHead().insertRow();
  for (const heading of headings) head.append(element("th", heading));
  const body = node.createTBody();
  for (const cells of rows) {
    const row = body.insertRow();
    for (const cell of cells) {
      const td = row.insertCell();
      if (cell instanceof Node) td.append(cell);
      else td.textContent = cell;
    }
  }
  return node;
}

function fieldRows(schema) {
  const resolved = resolve(schema);
  const required = new Set(resolved.required || []);
  return Object.entries(resolved.properties || {}).map(([name, field]) => [
    element("code", name), typeOf(field),
    required.has(name) ? "required" : (field.default !== undefined ?
      `default ${JSON.stringify(field.default)}` : "optional"),
    field.description || "",
  ]);
}

function operation(path, method, op) {
  const card = element("section", undefined, "card operation");
  card.id = op.operationId || `${method}-${path}`;
  const title = element("h2");
  title.append(element("span", method.toUpperCase(), `method ${method}`), " ",
               element("code", path));
  card.append(title, element("p", op.summary || ""));
  if (op.description) card.append(element("p", op.description, "muted"));

  const parameters = (op.parameters || []).map((parameter) => [
    element("code", parameter.name), parameter.in, typeOf(parameter.schema || {}),
    parameter.description || "",
  ]);
  if (parameters.length) {
    card.append(element("h3", "Parameters"), table(["name", "in", "type", ""], parameters));
  }
  for (const [type, content] of Object.entries((op.requestBody || {}).content || {})) {
    card.append(element("h3", `Body (${type})`),
                table(["field", "type", "", ""], fieldRows(content.schema)));
  }
  const responses = Object.entries(op.responses || {}).map(([code, response]) => {
    const schema = Object.values(response.content || {})[0]?.schema;
    return [code, response.description || "", schema ? typeOf(schema) : ""];
  });
  card.append(element("h3", "Answers"), table(["status", "", "body"], responses));
  return card;
}

async function main() {
  try {
    const response = await fetch("/openapi.json");
    spec = await response.json();
  } catch (err) {
    $("#error").textContent = `Could not read /openapi.json: ${err.message}`;
    $("#error").hidden = false;
    return;
  }
  $("#title").textContent = `${spec.info.title} HTTP API`;
  $("#description").textContent = spec.info.description || "";
  const list = $("#operations");
  for (const [path, methods] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(methods)) list.append(operation(path, method, op));
  }
}

main();
