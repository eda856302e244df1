/** package.json points at files that exist: `main` (the library surface) and the CLI in `bin`. */
import { expect } from 'chai';
import * as fs from 'node:fs';
import * as path from 'node:path';

const root = path.resolve(__dirname, '..', '..');
const pkg = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8')) as {
  main: string;
  bin: Record<string, string>;
};

describe('package.json', () => {
  it('main is the built library surface and exports the device, the back-end and the errors', async () => {
    const lib = (await import(path.join(root, pkg.main))) as Record<string, unknown>;
    for (const name of ['BalloonDevice', 'VhostUserBackend', 'VballoonError', 'ErrorCode'])
      expect(lib[name], name).to.not.equal(undefined);
  });

  it('every bin entry exists', () => {
    for (const file of Object.values(pkg.bin)) expect(fs.existsSync(path.join(root, file)), file).to.equal(true);
  });
});
