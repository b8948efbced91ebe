// A real OpenID Connect provider for the login and role tests: panva/node-oidc-provider (OpenID
// Certified), configured, not written here. It listens on 127.0.0.1:$PORT and issues signed JWT access
// tokens (RS256, a key made at start, published at /jwks) by the client-credentials grant, one client
// per role set, with Keycloak's claim layout (preferred_username, realm_access.roles) that MONAI Label
// reads by default.
import { generateKeyPairSync, randomUUID } from 'node:crypto';
import Provider from 'oidc-provider';

const port = Number(process.env.PORT);
if (!port) throw new Error("set PORT");
const ROLES = ['user', 'annotator', 'reviewer', 'admin'];
// one client per single role (so a test sees exactly what each role opens), one with no role, and
// `metaapp-everyone` with all four (Keycloak's composite admin); `metaapp-expiring` as everyone, 1-s tokens
const people = { ...Object.fromEntries(ROLES.map((r) => [r, [r]])), norole: [], everyone: ROLES, expiring: ROLES };
const clients = Object.entries(people).map(([name, roles]) => ({
  client_id: `metaapp-${name}`, client_secret: `${name}-secret`, grant_types: ['client_credentials'],
  redirect_uris: [], response_types: [], token_endpoint_auth_method: 'client_secret_post',
  username: name, roles: roles.map((r) => `monailabel-${r}`),
}));
const key = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });
const provider = new Provider(`http://127.0.0.1:${port}`, {
  clients,
  jwks: { keys: [{ ...key, kid: randomUUID(), use: 'sig', alg: 'RS256' }] },
  extraClientMetadata: { properties: ['roles', 'username'] },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => 'urn:monailabel',
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resource, client) => ({
        scope: 'openid', audience: 'monailabel', accessTokenFormat: 'jwt',
        accessTokenTTL: client.clientId === 'metaapp-expiring' ? 1 : 600,
        jwt: { sign: { alg: 'RS256' } },
      }),
    },
  },
  extraTokenClaims: (ctx) => ({
    preferred_username: ctx.oidc.client.username,
    realm_access: { roles: ctx.oidc.client.roles },
  }),
});
provider.listen(port, '127.0.0.1', () => console.log(`listening ${provider.issuer}`));
