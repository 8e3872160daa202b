// Preloaded into the conformance suite (`node --import bearer.mjs SUITE ...`), which has no option for
// credentials: every HTTP request to NSPAWN_MCP_BEARER_ORIGIN (the daemon's http://HOST:PORT) carries
// `Authorization: Bearer $NSPAWN_MCP_BEARER_TOKEN` unless it sets an Authorization of its own. The suite
// speaks through undici (fetch and undici.request), which share one global dispatcher; this wraps it.
// Requests to any other origin are left untouched. NSPAWN_MCP_BEARER_UNDICI names a file (the suite's entry
// point) from which to resolve the suite's own undici.
import { createRequire } from "node:module";

const token = process.env.NSPAWN_MCP_BEARER_TOKEN;
const origin = process.env.NSPAWN_MCP_BEARER_ORIGIN;
const resolveFrom = process.env.NSPAWN_MCP_BEARER_UNDICI;
if (!token || !origin || !resolveFrom) {
  throw new Error("bearer.mjs needs NSPAWN_MCP_BEARER_TOKEN, NSPAWN_MCP_BEARER_ORIGIN and NSPAWN_MCP_BEARER_UNDICI");
}
const { Agent, setGlobalDispatcher } = createRequire(resolveFrom)("undici");

function withBearer(headers) {
  if (headers == null) {
    return { authorization: `Bearer ${token}` };
  }
  if (Array.isArray(headers)) {
    const names = headers.filter((_, index) => index % 2 === 0).map((name) => String(name).toLowerCase());
    return names.includes("authorization") ? headers : [...headers, "authorization", `Bearer ${token}`];
  }
  const names = Object.keys(headers).map((name) => name.toLowerCase());
  return names.includes("authorization") ? headers : { ...headers, authorization: `Bearer ${token}` };
}

const addBearer = (dispatch) => (options, handler) => {
  if (new URL(String(options.origin)).origin !== origin) {
    return dispatch(options, handler);
  }
  return dispatch({ ...options, headers: withBearer(options.headers) }, handler);
};

setGlobalDispatcher(new Agent().compose(addBearer));
