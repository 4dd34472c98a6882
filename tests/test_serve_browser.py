"""The page in a real browser, on what a stranger has after the demo: `cg3d-demo`'s trained model, `cg3d-embed` over
the demo's procedural shapes, the page of `cg3d-serve`; headless Debian Chromium (WebGL through SwiftShader, no GPU),
driven by Playwright without a downloaded browser. docs/serve_classify.png is this test's screenshot."""

import json

import numpy as np

from tests.conftest import run_command

CHROMIUM = '/usr/bin/chromium'  # Debian's (apt-get install chromium): Playwright downloads no browser here


def test_a_real_browser_classifies_an_upload_and_draws_the_cloud(demo_run, tmp_path):
  """Upload one of the demo's shapes, type the demo's 13 class names, click Classify: the answer names the file and
  the handler's top label, and the 3D view is drawn (its pixels hold the colour scale's many colours, not a blank
  canvas); the library embedded from the demo's shapes is on the page. The screenshot is saved beside the test's
  files (copied to docs/serve_classify.png)."""
  from PIL import Image
  from playwright.sync_api import sync_playwright

  from cg3d_jax import embed, serve

  manual = demo_run.workdir / 'demo_assets' / 'shapenet55'
  shapes = manual / 'shapenet_pc'
  argv = ['--checkpoint', str(demo_run.workdir), '--shapes', str(shapes), '--library', str(tmp_path / 'library')]
  assert run_command(embed.main, argv) == 0
  library = json.loads((tmp_path / 'library' / 'library.json').read_text())
  assert library['count'] == len(list(shapes.glob('*.npy')))
  names = (manual / 'shape_names.txt').read_text().split()
  cloud = sorted(shapes.glob('*.npy'))[-1]

  page = serve.Page(str(demo_run.workdir), library=str(tmp_path / 'library'))
  expected = page.classify(str(cloud), ', '.join(names), None)[1][0][1]
  app = serve.build_app(page)
  app.launch(server_name='127.0.0.1', server_port=None, prevent_thread_lock=True, quiet=True)
  try:
    with sync_playwright() as playwright:
      gl = ['--use-gl=angle', '--use-angle=swiftshader', '--enable-unsafe-swiftshader']
      browser = playwright.chromium.launch(executable_path=CHROMIUM, args=['--no-sandbox', *gl])
      tab = browser.new_page(viewport={'width': 1280, 'height': 900})
      tab.goto(app.local_url)
      tab.locator('input[type=file]').first.set_input_files(str(cloud))
      tab.get_by_label('labels (comma-separated)').fill(', '.join(names))
      tab.get_by_role('button', name='Classify').click()
      tab.locator('#classify-message').get_by_text(cloud.name).wait_for(timeout=60_000)
      tab.locator('#classify-view canvas').first.wait_for(timeout=30_000)
      tab.wait_for_timeout(1500)  # the WebGL scene draws after the DOM settles
      tab.locator('#classify-view').screenshot(path=str(tmp_path / 'view.png'))
      tab.screenshot(path=str(tmp_path / 'serve_classify.png'), full_page=True)
      top = tab.locator('#classify-top').inner_text()
      header = tab.locator('body').inner_text()
      browser.close()
  finally:
    app.close()
  assert expected in top and str(demo_run.workdir) in header and 'library' in header
  pixels = np.asarray(Image.open(tmp_path / 'view.png').convert('RGB')).reshape(-1, 3)
  assert len(np.unique(pixels, axis=0)) > 50, 'the 3D view looks blank'
