// The index page's list of the models this server serves (GET /v1/models), each linked to
// its try-it page (/try/NAME: a form from its input spec; an image model's page leads back
// to the drawing pad). Independent of app.js: the list shows even when digits is not served.

const list = document.getElementById('model-list');
const note = document.getElementById('models-note');

function item(model) {
  const li = document.createElement('li');
  li.dataset.model = model.name;
  const link = document.createElement('a');
  link.href = `/try/${encodeURIComponent(model.name)}`;
  link.dataset.testid = `try-${model.name}`;
  link.textContent = model.name;
  const channels = Object.entries(model.channels ?? {})
    .filter(([, c]) => c?.version != null)
    .map(([name, c]) => `${name} → v${c.version}`);
  const facts = document.createElement('span');
  facts.className = 'model-meta';
  facts.textContent = ` · ${model.versions} version${model.versions === 1 ? '' : 's'}, newest v${model.latest_version}${channels.length ? ` · ${channels.join(', ')}` : ''}`;
  li.append(link, facts);
  return li;
}

export async function listModels() {
  try {
    const response = await fetch('/v1/models', { headers: { Accept: 'application/json' }, cache: 'no-store' });
    if (!response.ok) throw new Error(`/v1/models answered ${response.status}`);
    const { models } = await response.json();
    list.replaceChildren(...models.map(item));
    note.textContent = models.length ? 'Each model’s try-it page predicts in this browser and on the server.' : 'No model is published yet.';
    list.dataset.state = 'ready';
    return models;
  } catch (error) {
    note.textContent = `The list of models is unavailable: ${error.message}`;
    list.dataset.state = 'error';
    return [];
  }
}

listModels();
