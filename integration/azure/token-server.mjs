// The Entra ID token endpoint for leasehold's Azure provider tests.
//
// oauth2-mock-server (npm) signs the tokens and serves the keys (`/jwks`);
// this file makes its token endpoint answer the way Entra's does for the
// client-credentials grant azure_identity uses:
//
//   POST /{tenant}/oauth2/v2.0/token   (client_secret or client_assertion)
//
// Who may log in comes from a registry file the ARM/Graph stand-in
// (integration/azure-standin) keeps, read on every request: tenants, their
// clients (app id -> service principal object id), each client's secrets
// (SHA-256 and end time, so an app password added through Graph works here
// and a removed or expired one does not) and federated credentials (issuer
// and subject of an assertion). Unknown tenant, unknown client or a wrong
// secret get Entra's error codes (AADSTS90002, 700016, 7000215). Tokens
// carry Entra's claims: tid, oid, sub, appid, azp, aud (the scope's
// resource), iss and exp (lifetime per resource from the registry, default
// one hour).
//
// Usage: node token-server.mjs --cert CERT --key KEY --registry FILE [--port N]
// Listens on 127.0.0.1, port N or a free one; prints `{"port": N}` on its first line.

import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { OAuth2Server } from 'oauth2-mock-server';

const { values: args } = parseArgs({
  options: {
    cert: { type: 'string' },
    key: { type: 'string' },
    registry: { type: 'string' },
    port: { type: 'string', default: '0' },
  },
});
for (const k of ['cert', 'key', 'registry']) {
  if (!args[k]) {
    console.error(`--${k} is required`);
    process.exit(2);
  }
}

function registry() {
  return JSON.parse(readFileSync(args.registry, 'utf8'));
}

function resourceOf(scope) {
  const first = String(scope || '').split(' ')[0];
  return first.endsWith('/.default') ? first.slice(0, -'/.default'.length) : first;
}

function sha256(s) {
  return createHash('sha256').update(s, 'utf8').digest('hex');
}

function claimsOf(jwt) {
  try {
    return JSON.parse(Buffer.from(String(jwt).split('.')[1], 'base64url').toString('utf8'));
  } catch {
    return null;
  }
}

function entraError(status, error, code, text) {
  return {
    statusCode: status,
    body: {
      error,
      error_description: `AADSTS${code}: ${text}`,
      error_codes: [code],
      timestamp: new Date().toISOString(),
      trace_id: '00000000-0000-0000-0000-000000000000',
      correlation_id: '00000000-0000-0000-0000-000000000000',
    },
  };
}

// Why Entra would refuse this request, or null with the client it is for.
function check(req) {
  const reg = registry();
  const tenantId = req.params.tenant;
  const tenant = reg.tenants[tenantId];
  if (!tenant) {
    return { refusal: entraError(400, 'invalid_request', 90002, `Tenant '${tenantId}' not found.`) };
  }
  const body = req.body || {};
  if (body.grant_type !== 'client_credentials') {
    return { refusal: entraError(400, 'unsupported_grant_type', 70003, 'The app requested an unsupported grant type.') };
  }
  const client = tenant.clients[body.client_id];
  if (!client) {
    return {
      refusal: entraError(400, 'unauthorized_client', 700016,
        `Application with identifier '${body.client_id}' was not found in the directory '${tenantId}'.`),
    };
  }
  const now = Date.now() / 1000;
  if (body.client_secret !== undefined) {
    const h = sha256(body.client_secret);
    if (!client.secrets.some((s) => s.sha256 === h && s.end > now)) {
      return {
        refusal: entraError(401, 'invalid_client', 7000215,
          `Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '${body.client_id}'.`),
      };
    }
  } else if (body.client_assertion !== undefined) {
    // Entra also checks the assertion's signature against its issuer's keys;
    // this stand-in checks only who it names (see README.md).
    const c = claimsOf(body.client_assertion);
    const ok = c && c.exp > now && (client.federated || []).some((f) => f.issuer === c.iss && f.subject === c.sub);
    if (!ok) {
      return {
        refusal: entraError(400, 'invalid_client', 700213,
          'No matching federated identity record found for presented assertion subject.'),
      };
    }
  } else {
    return { refusal: entraError(400, 'invalid_client', 7000218, "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.") };
  }
  return { tenantId, client, lifetimes: reg.lifetimes || {} };
}

const server = new OAuth2Server(args.key, args.cert, {
  endpoints: { token: '/:tenant/oauth2/v2.0/token' },
});
await server.issuer.keys.generate('RS256');

server.service.on('beforeTokenSigning', (token, req) => {
  const { refusal, tenantId, client, lifetimes } = check(req);
  if (refusal) return;
  const resource = resourceOf(req.body.scope);
  const now = Math.floor(Date.now() / 1000);
  Object.assign(token.payload, {
    iss: `${server.issuer.url}/${tenantId}/v2.0`,
    aud: resource,
    tid: tenantId,
    oid: client.object_id,
    sub: client.object_id,
    appid: req.body.client_id,
    azp: req.body.client_id,
    idtyp: 'app',
    ver: '2.0',
    iat: now,
    nbf: now,
    exp: now + (lifetimes[resource] || 3600),
  });
});

server.service.on('beforeResponse', (response, req) => {
  const { refusal, lifetimes } = check(req);
  if (refusal) {
    response.statusCode = refusal.statusCode;
    response.body = refusal.body;
    return;
  }
  response.body.expires_in = lifetimes[resourceOf(req.body.scope)] || 3600;
  response.body.ext_expires_in = response.body.expires_in;
  delete response.body.id_token;
  delete response.body.refresh_token;
});

await server.start(Number(args.port), '127.0.0.1');
console.log(JSON.stringify({ port: server.address().port }));

for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => server.stop().finally(() => process.exit(0)));
}
