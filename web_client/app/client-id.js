// One id per browser for the demo and try-it pages: the server's staged rollouts pick a
// cohort from it, so the same browser is in the same cohort on every page. null when storage
// is unavailable (private mode): the client then asks without an id.
export function clientId() {
  try {
    let id = localStorage.getItem('pollinate.clientId');
    if (!id) {
      id = crypto.randomUUID?.() ?? `c-${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
      localStorage.setItem('pollinate.clientId', id);
    }
    return id;
  } catch {
    return null;
  }
}
