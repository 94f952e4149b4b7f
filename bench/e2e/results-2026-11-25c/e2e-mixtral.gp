# gnuplot e2e-mixtral.gp (from the folder holding e2e-mixtral.dat) writes e2e-mixtral.png
set terminal pngcairo size 1600,2280 font ',9' noenhanced
set output 'e2e-mixtral.png'
set multiplot layout 6,1
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set logscale y
set ylabel 'ms/token'
set grid ytics
set xtics rotate by -40 font ',8'
set key top right
set title '.devdata/gsm8k_2_routing.jsonl, batch 1: measured vs simulator (mixtral shapes, per token over 32 layers)'
plot 'e2e-mixtral.dat' index 0 using 2:xtic(1) title 'measured', '' index 0 using 3 title 'simulator'
set title 'live (random routers, speculative prefetch), batch 1: measured vs simulator (mixtral shapes, per token over 32 layers)'
plot 'e2e-mixtral.dat' index 1 using 2:xtic(1) title 'measured', '' index 1 using 3 title 'simulator'
set title '.devdata/gsm8k_2_routing.jsonl, batch 4: measured vs simulator (mixtral shapes, per token over 32 layers)'
plot 'e2e-mixtral.dat' index 2 using 2:xtic(1) title 'measured', '' index 2 using 3 title 'simulator'
set title 'live (random routers, speculative prefetch), batch 4: measured vs simulator (mixtral shapes, per token over 32 layers)'
plot 'e2e-mixtral.dat' index 3 using 2:xtic(1) title 'measured', '' index 3 using 3 title 'simulator'
set title '.devdata/gsm8k_2_routing.jsonl, batch 16: measured vs simulator (mixtral shapes, per token over 32 layers)'
plot 'e2e-mixtral.dat' index 4 using 2:xtic(1) title 'measured', '' index 4 using 3 title 'simulator'
set title 'live (random routers, speculative prefetch), batch 16: measured vs simulator (mixtral shapes, per token over 32 layers)'
plot 'e2e-mixtral.dat' index 5 using 2:xtic(1) title 'measured', '' index 5 using 3 title 'simulator'
unset multiplot
