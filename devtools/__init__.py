"""What the tests, the benchmarks and the container check need to run this checkout's
service (`bentoml serve` on a free port, stopped as Kubernetes stops it), kept out of the
package that ships: not in the wheel, not in the Bento."""
